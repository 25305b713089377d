"""Stage 1 on real images: equality with single-process Keras, bad input, the broadcast."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.base.contract import read_model_spec
from stages.base.errors import UsageError
from stages.featurize import featurize
from stages.featurize.model import BUNDLED_WEIGHTS
from stages.featurize.partition import label_from_path
from tests.conftest import SAMPLE

pytestmark = pytest.mark.slow


def read_features(path: Path) -> dict:
    """{file name relative to its class: (label, features or None, error)} via pyarrow."""
    t = pq.read_table(path).to_pydict()
    out = {}
    for p, lab, f, e in zip(t["path"], t["label"], t["features"], t["error"]):
        out["/".join(p.split("/")[-2:])] = (
            lab,
            None if f is None else np.asarray(f, np.float32),
            e,
        )
    return out


def keras_reference(files) -> np.ndarray:
    """Single-process Keras (load_img, preprocess_input, predict_on_batch), weights from the .h5."""
    import tensorflow as tf

    model = tf.keras.applications.MobileNetV2(
        input_shape=(224, 224, 3),
        alpha=0.35,
        include_top=False,
        pooling="avg",
        weights=str(BUNDLED_WEIGHTS),
    )
    x = np.stack(
        [
            tf.keras.utils.img_to_array(
                tf.keras.utils.load_img(f, target_size=(224, 224), interpolation="bilinear")
            )
            for f in files
        ]
    )
    x = tf.keras.applications.mobilenet_v2.preprocess_input(x)
    return np.asarray(model.predict_on_batch(x))


def _by_file(features: Path, files) -> np.ndarray:
    got = read_features(features)
    rows = [got[f"{f.parent.name}/{f.name}"] for f in files]
    assert all(err is None and label == f.parent.name for (label, _, err), f in zip(rows, files))
    return np.stack([feats for _, feats, _ in rows])


def test_keras_engine_equals_single_process_keras(keras_sample_features):
    got = read_features(keras_sample_features)
    files = sorted(SAMPLE.glob("*/*.jpg"))
    assert len(got) == len(files) == 100
    ref = keras_reference(files)
    diffs = []
    for f, r in zip(files, ref):
        label, feats, err = got[f"{f.parent.name}/{f.name}"]
        assert err is None and label == f.parent.name
        assert feats.shape == (1280,)
        diffs.append(np.abs(feats - r).max())
    assert max(diffs) <= 1e-5
    # Real ImageNet features of fruit photos: many exact zeros, not a constant vector.
    allf = np.stack([v[1] for v in got.values()])
    assert 0.2 < (allf == 0).mean() < 0.9 and allf.std() > 0.1


def assert_litert_agrees(lite: np.ndarray, keras: np.ndarray) -> None:
    """The LiteRT engine's agreement with Keras: max |d| <= 2e-4, cosine >= 0.99999 per row."""
    assert lite.shape == keras.shape and lite.dtype == np.float32
    assert np.abs(lite - keras).max() <= 2e-4
    lite64, keras64 = lite.astype(np.float64), keras.astype(np.float64)
    norms = np.linalg.norm(lite64, axis=1) * np.linalg.norm(keras64, axis=1)
    cos = (lite64 * keras64).sum(1) / norms
    assert cos.min() >= 0.99999


def test_litert_engine_agrees_with_the_keras_engine(sample_features, keras_sample_features):
    files = sorted(SAMPLE.glob("*/*.jpg"))
    lite = _by_file(sample_features, files)
    keras = _by_file(keras_sample_features, files)
    assert len(files) == 100
    assert_litert_agrees(lite, keras)
    # Not equal by construction: two runtimes, two summation orders.
    assert not np.array_equal(lite, keras)


def test_labels_keep_spaces_and_the_model_metadata_is_stored(spark, sample_features):
    labels = {v[0] for v in read_features(sample_features).values()}
    assert "Apple Braeburn" in labels and "Apple Granny Smith" in labels
    assert not any("%" in lab for lab in labels)
    meta = read_model_spec(spark.read.parquet(str(sample_features)).schema)
    assert meta["name"] == "MobileNetV2" and meta["alpha"] == 0.35
    assert meta["weights_source"].startswith("bundled:") and len(meta["weights_sha256"]) == 64
    assert meta["input_size"] == 224 and meta["engine"] == "litert"
    # No Parquet dictionary for the floats (always abandoned, costly), one for the labels.
    part = next(sample_features.glob("part-*.parquet"))
    chunks = pq.ParquetFile(part).metadata.row_group(0)
    by_path = {chunks.column(i).path_in_schema: chunks.column(i) for i in range(4)}
    assert not by_path["features.list.element"].has_dictionary_page
    assert by_path["label"].has_dictionary_page
    assert meta["versions"]["ai_edge_litert"] and meta["versions"]["tflite_converter"]


def test_keras_engine_is_recorded(spark, sample_features, keras_sample_features):
    keras = read_model_spec(spark.read.parquet(str(keras_sample_features)).schema)
    lite = read_model_spec(spark.read.parquet(str(sample_features)).schema)
    assert keras["engine"] == "keras" and keras["versions"]["tensorflow"]
    # Same weights, same model identity: the reduce may mix the two engines' features.
    assert keras["weights_sha256"] == lite["weights_sha256"]


@pytest.mark.parametrize(
    ("path", "encoded", "label"),
    [
        ("file:/data/Apple Braeburn/1.jpg", False, "Apple Braeburn"),
        ("file:/data/Apple%20Braeburn/1.jpg", True, "Apple Braeburn"),
        ("s3a://b/Test/50%off/1.jpg", False, "50%off"),
        ("s3a://b/Test/50%25off/1.jpg", True, "50%off"),
    ],
)
def test_label_from_path(path, encoded, label):
    assert label_from_path(path, encoded) == label


def _jpeg_of(photo: Path, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.open(photo).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_input(tmp_path_factory) -> Path:
    """Real photos plus every kind of bad or odd file, in folders with spaces and '%'."""
    root = tmp_path_factory.mktemp("messy")
    good = sorted((SAMPLE / "Banana").glob("*.jpg"))[:3]
    (root / "Banana split").mkdir()
    for f in good:
        shutil.copy(f, root / "Banana split" / f.name)
    odd = root / "50%off"
    odd.mkdir()
    data = good[0].read_bytes()
    (odd / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10)
    (odd / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "text.jpeg").write_bytes(b"hello, I am a text file\n")
    buf = io.BytesIO()
    Image.open(good[1]).save(buf, format="PNG")
    (odd / "really_png.jpg").write_bytes(buf.getvalue())
    # Other modes of a real photo (a flat colour is refused: test_no_image_lost.py).
    (odd / "gray.JPG").write_bytes(_jpeg_of(good[2], "L"))
    (odd / "cmyk.jpeg").write_bytes(_jpeg_of(good[2], "CMYK"))
    (odd / "notes.txt").write_text("not an image, not a .jpg: ignored")
    return root


@pytest.fixture(scope="module")
def messy_features(spark, messy_input, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("messy_out") / "Features"
    report = featurize(spark, str(messy_input), str(out), weights="bundled", batch_size=4)
    assert report.images == 10 and report.errors == 4
    return out


def test_bad_files_become_error_rows_with_reasons(messy_features):
    got = read_features(messy_features)
    assert set(got) == {
        "Banana split/" + f.name for f in sorted((SAMPLE / "Banana").glob("*.jpg"))[:3]
    } | {
        f"50%off/{n}"
        for n in (
            "corrupt.jpg",
            "truncated.jpg",
            "empty.jpg",
            "text.jpeg",
            "really_png.jpg",
            "gray.JPG",
            "cmyk.jpeg",
        )
    }
    reasons = {k.split("/")[1]: v[2] for k, v in got.items() if v[2] is not None}
    assert set(reasons) == {"corrupt.jpg", "truncated.jpg", "empty.jpg", "text.jpeg"}
    assert "empty file" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text.jpeg"]
    for name in reasons:
        assert got[f"50%off/{name}"][1] is None  # never a zero vector
    assert {v[0] for k, v in got.items()} == {"Banana split", "50%off"}


def test_png_gray_and_cmyk_are_featurized_like_keras(messy_input, messy_features):
    got = read_features(messy_features)
    names = ["really_png.jpg", "gray.JPG", "cmyk.jpeg"]
    ref = keras_reference([messy_input / "50%off" / n for n in names])
    assert all(got[f"50%off/{n}"][2] is None for n in names)
    assert_litert_agrees(np.stack([got[f"50%off/{n}"][1] for n in names]), ref)


def _worker_modules(batches):
    """mapInArrow probe: this Python worker's pid and which heavy modules it holds."""
    import os
    import sys

    import pyarrow as pa

    for _ in batches:
        held = [m for m in ("tensorflow", "keras", "h5py") if m in sys.modules]
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "held": [",".join(held)]})


def test_litert_workers_build_once_import_no_tensorflow_read_no_weights(
    spark, keras_home, tmp_path
):
    sc = spark.sparkContext
    # Workers see the empty read-only KERAS_HOME: weights can only come by broadcast.
    seen = sc.parallelize([0], 1).map(lambda _: os.environ.get("KERAS_HOME")).collect()
    assert seen == [str(keras_home)]
    # Another executor environment gets its own pool of fresh Python workers, none of
    # which ran an earlier test's Keras job.
    sc.environment["FRUITS_TEST_WORKER_POOL"] = "litert-only"
    try:
        report = featurize(
            spark,
            str(SAMPLE),
            str(tmp_path / "F"),
            weights="random:7",
            alpha=0.35,
            partitions=6,
            batch_size=8,
        )
        probe = (
            spark.range(0, 12, numPartitions=12)
            .mapInArrow(_worker_modules, "pid long, held string")
            .collect()
        )
    finally:
        del sc.environment["FRUITS_TEST_WORKER_POOL"]
    assert report.model["engine"] == "litert"
    assert report.partitions == 6 and report.images == 100 and report.errors == 0
    # One build per Python worker process, not one per task (local[2]: two workers).
    assert report.model_builds == len(report.worker_pids) < report.partitions
    # The probe ran in the very workers that featurized: they hold no TensorFlow.
    assert set(report.worker_pids) <= {r["pid"] for r in probe}
    assert {r["held"] for r in probe} == {""}
    assert list(keras_home.iterdir()) == []


def test_keras_engine_builds_once_per_worker(spark, keras_home, tmp_path):
    report = featurize(
        spark,
        str(SAMPLE / "Kiwi"),
        str(tmp_path / "F"),
        weights="random:7",
        alpha=0.35,
        partitions=4,
        batch_size=4,
        engine="keras",
    )
    assert report.model["engine"] == "keras" and report.images == 10 and report.errors == 0
    assert report.model_builds == len(report.worker_pids) < report.partitions
    assert list(keras_home.iterdir()) == []


def test_partitions_follow_the_image_count_not_bytes(spark, tmp_path):
    # 100 tiny JPEGs would be 4 tasks of ~30 by Spark's 4 MB packing; we want one per core.
    report = featurize(spark, str(SAMPLE), str(tmp_path / "F"), weights="random:1", alpha=0.35)
    assert report.partitions == spark.sparkContext.defaultParallelism == 2


def test_rerun_without_overwrite_refuses_and_keeps_old_output(spark, sample_features):
    before = {p.name: p.read_bytes() for p in sample_features.iterdir() if p.is_file()}
    with pytest.raises(UsageError, match="already exists: pass --overwrite"):
        featurize(spark, str(SAMPLE), str(sample_features), weights="bundled")
    after = {p.name: p.read_bytes() for p in sample_features.iterdir() if p.is_file()}
    assert after == before and any(n.endswith(".parquet") for n in after)


def test_overwrite_replaces(spark, tmp_path):
    out = tmp_path / "F"
    featurize(spark, str(SAMPLE / "Kiwi"), str(out), weights="random:2", alpha=0.35)
    report = featurize(
        spark,
        str(SAMPLE / "Lemon"),
        str(out),
        weights="random:2",
        alpha=0.35,
        overwrite=True,
        jpeg_draft=2,
    )
    labels = {v[0] for v in read_features(out).values()}
    assert report.images == 10 and labels == {"Lemon"}
    assert read_model_spec(spark.read.parquet(str(out)).schema)["jpeg_draft"] == 2


def test_a_hadoop_scan_counts_the_error_rows_it_adds(spark, tmp_path):
    # A remote INPUT (s3a://, hdfs://) is scanned by Spark, which drops zero-byte files;
    # the report counts their error rows without running the join that makes them.
    from stages.featurize.batch import _HadoopScan
    from stages.featurize.model import ModelSpec

    src = sorted(SAMPLE.glob("*/*.jpg"))[:3]
    for i, f in enumerate(src):
        (tmp_path / "Kiwi 50%").mkdir(exist_ok=True)  # a '%' name: paths come URL-encoded
        shutil.copyfile(f, tmp_path / "Kiwi 50%" / f"{i}.jpg")
    (tmp_path / "Kiwi 50%" / "empty.jpg").write_bytes(b"")
    (tmp_path / "Lime").mkdir()
    (tmp_path / "Lime" / "empty too.jpg").write_bytes(b"")
    scan = _HadoopScan(spark, tmp_path.as_uri())
    spec = ModelSpec(alpha=0.35, weights_source="test", weights_sha256="0")
    rows = scan.extra_rows(spark, spec).collect()
    assert scan.n_images == 3 and scan.n_extra == len(rows) == 2
    assert sorted(r["error"] for r in rows) == ["empty file (0 bytes)"] * 2
