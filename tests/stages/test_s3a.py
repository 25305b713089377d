"""Both stages against S3 through Hadoop's real S3A connector (moto's server on 127.0.0.1).

What a local-path test cannot see: listing and reading images by ``s3a://`` URIs,
labels with spaces in object keys, Spark's commit protocol writing Parquet on an
object store (part files, ``_SUCCESS``, no ``_temporary/`` left), our own
``hadoopfs`` helpers (exists, footers, ``summary.json``, ``pca_model/``) on S3A, and
the one-line errors for a missing prefix.  The bucket's files are read back with
boto3 and pyarrow, not through Spark, so what is checked is what S3 holds.
"""

from __future__ import annotations

import json
import posixpath
import shutil
from typing import Dict, List, Tuple

import numpy as np
import pytest

from stages.base.errors import UsageError
from stages.storage.shards import SHARD_FILES
from tests import s3_fixtures
from tests.conftest import SAMPLE
from tests.s3_fixtures import BUCKET, close_s3a_filesystem, list_keys, read_parquet_from_bucket

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# The module-scoped fixtures of tests/s3_fixtures.py, made visible to this module.
moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client
s3a_spark = s3_fixtures.s3a_spark
s3a_sample_bucket = s3_fixtures.s3a_sample_bucket

IMAGES = f"s3a://{BUCKET}/Test/"
FEATURES = f"s3a://{BUCKET}/Features/"
RESULTS = f"s3a://{BUCKET}/Results/"


def _features_by_image(table) -> Dict[Tuple[str, str], np.ndarray]:
    """``(label, file name) -> features`` of a features table with no error rows."""
    assert table.column("error").null_count == table.num_rows
    out = {}
    for path, label, feats in zip(
        table.column("path").to_pylist(),
        table.column("label").to_pylist(),
        table.column("features").to_pylist(),
    ):
        out[(label, posixpath.basename(path))] = np.asarray(feats, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def s3a_features(s3a_spark, s3a_sample_bucket):
    """Stage 1 from ``s3a://bucket/Test/`` to ``s3a://bucket/Features/``; its report."""
    from stages.featurize import featurize

    return featurize(s3a_spark, IMAGES, FEATURES, weights="bundled")


@pytest.fixture(scope="module")
def s3a_results(s3a_spark, s3a_features):
    """Stage 2 from ``s3a://bucket/Features/`` to ``s3a://bucket/Results/`` (k=5); its summary."""
    from stages.reduce import reduce_features

    return reduce_features(s3a_spark, FEATURES, RESULTS, k=5, variance=None)


def test_featurize_commits_parquet_to_the_bucket(moto_s3_client, s3a_sample_bucket, s3a_features):
    keys = list_keys(moto_s3_client, "Features/")
    names = [posixpath.basename(k) for k in keys]
    assert "Features/_SUCCESS" in keys
    assert any(n.startswith("part-") and n.endswith(".parquet") for n in names), keys
    # The commit moved every task's output in place and cleaned up after itself.
    assert not [k for k in keys if "_temporary" in k or ".spark-staging" in k], keys
    assert s3a_features.images == len(s3a_sample_bucket) == 100
    assert s3a_features.errors == 0
    assert s3a_features.output == FEATURES


def test_s3a_features_equal_local_features(
    moto_s3_client, s3a_sample_bucket, s3a_features, sample_features
):
    import pyarrow.parquet as pq

    table = read_parquet_from_bucket(moto_s3_client, "Features/")
    # Paths are the object URIs, labels the folder names exactly as in the keys
    # ("Apple Braeburn", never "Apple%20Braeburn").
    assert sorted(table.column("path").to_pylist()) == sorted(
        f"s3a://{BUCKET}/{k}" for k in s3a_sample_bucket
    )
    labels = set(table.column("label").to_pylist())
    assert labels == {p.name for p in SAMPLE.iterdir() if p.is_dir()}
    assert "Apple Braeburn" in labels

    on_s3 = _features_by_image(table)
    local = _features_by_image(pq.read_table(str(sample_features)))
    assert len(on_s3) == len(local) == table.num_rows == 100
    assert on_s3.keys() == local.keys()
    diffs = [float(np.max(np.abs(on_s3[key] - local[key]))) for key in local]
    assert max(diffs) <= 1e-5, f"max abs diff {max(diffs)} between s3a and local features"
    assert all(v.shape == (1280,) for v in on_s3.values())


def test_s3a_features_record_the_model_in_their_footers(s3a_spark, s3a_features, sample_features):
    from stages.base.contract import read_model_spec

    on_s3 = read_model_spec(s3a_spark.read.parquet(FEATURES).schema)
    local = read_model_spec(s3a_spark.read.parquet(str(sample_features)).schema)
    assert on_s3 is not None
    assert (
        on_s3["weights_sha256"] == local["weights_sha256"] == s3a_features.model["weights_sha256"]
    )
    assert on_s3["alpha"] == 0.35


def test_reduce_reads_and_writes_the_bucket(moto_s3_client, s3a_features, s3a_results):
    keys = set(list_keys(moto_s3_client, "Results/"))
    for key in (
        "Results/projections/_SUCCESS",
        "Results/pca_model/arrays.npz",
        "Results/pca_model/model.json",
        "Results/summary.json",
    ):
        assert key in keys, sorted(keys)
    assert not [k for k in keys if "_temporary" in k or ".spark-staging" in k], sorted(keys)

    summary = json.loads(
        moto_s3_client.get_object(Bucket=BUCKET, Key="Results/summary.json")["Body"].read()
    )
    assert summary["rows"] == 100
    assert summary["error_rows"] == 0
    assert summary["k"] == 5
    assert summary["n_features"] == 1280
    assert summary["features"] == FEATURES
    assert summary["features_model"]["weights_sha256"] == s3a_features.model["weights_sha256"]
    assert summary["explained_variance_ratio"] == pytest.approx(
        s3a_results["explained_variance_ratio"], rel=1e-12
    )


def test_reduce_indexes_the_bucket_from_the_features_thumbnails(moto_s3_client, s3a_results):
    keys = set(list_keys(moto_s3_client, "Results/"))
    assert "Results/index/index.json" in keys, sorted(keys)
    assert not [k for k in keys if ".fruits-" in k], sorted(keys)
    meta = json.loads(
        moto_s3_client.get_object(Bucket=BUCKET, Key="Results/index/index.json")["Body"].read()
    )
    assert meta["rows"] == 100 and meta["dims"] == 5 and meta["kind"] == "exact"
    assert meta["thumbnails"]["missing"] == 0 and sum(s["rows"] for s in meta["shards"]) == 100
    for shard in meta["shards"]:  # each shard's files went up through the driver's disk
        for name in SHARD_FILES:  # keys.npy among them
            assert f"Results/index/shards/{shard['name']}/{name}" in keys, sorted(keys)
    first = meta["shards"][0]["name"]
    thumbs = moto_s3_client.get_object(
        Bucket=BUCKET, Key=f"Results/index/shards/{first}/thumbs.bin"
    )["Body"]
    assert thumbs.read(3) == b"\xff\xd8\xff"  # the first thumbnail is a JPEG


def test_s3a_projections_are_the_saved_model_applied_to_the_saved_features(
    moto_s3_client, s3a_results
):
    from stages.reduce.pca_model import PCAModel

    def get(key: str) -> bytes:
        return moto_s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    model = PCAModel.from_files(
        get("Results/pca_model/arrays.npz"), get("Results/pca_model/model.json")
    )
    assert model.n_components_ == 5
    features = read_parquet_from_bucket(moto_s3_client, "Features/")
    X = np.stack([np.asarray(f, dtype=np.float32) for f in features.column("features").to_pylist()])
    expected = dict(zip(features.column("path").to_pylist(), model.transform(X)))

    proj = read_parquet_from_bucket(moto_s3_client, "Results/projections/")
    got = dict(zip(proj.column("path").to_pylist(), proj.column("pca").to_pylist()))
    assert got.keys() == expected.keys()
    assert len(got) == 100
    labels = dict(zip(proj.column("path").to_pylist(), proj.column("label").to_pylist()))
    assert all(posixpath.basename(posixpath.dirname(p)) == lab for p, lab in labels.items())

    A = np.array([got[p] for p in sorted(got)])
    B = np.array([expected[p] for p in sorted(got)])
    scale = float(np.max(np.abs(B)))
    assert scale > 0
    np.testing.assert_allclose(A, B, rtol=0, atol=1e-8 * scale)


def test_featurize_missing_s3a_prefix_is_a_usage_error(s3a_spark, s3a_sample_bucket):
    from stages.featurize import featurize

    with pytest.raises(UsageError, match=r"input s3a://bucket/Nope/ does not exist"):
        featurize(s3a_spark, f"s3a://{BUCKET}/Nope/", f"s3a://{BUCKET}/Out/", weights="bundled")


def test_featurize_prefix_without_images_is_a_usage_error(
    s3a_spark, moto_s3_client, s3a_sample_bucket
):
    from stages.featurize import featurize

    moto_s3_client.put_object(Bucket=BUCKET, Key="NoImages/readme.txt", Body=b"not a photo")
    with pytest.raises(UsageError, match=r"no \.jpg/\.jpeg images under s3a://bucket/NoImages/"):
        featurize(s3a_spark, f"s3a://{BUCKET}/NoImages/", f"s3a://{BUCKET}/Out/")


def test_featurize_existing_s3a_output_is_a_usage_error(moto_s3_client, s3a_spark, s3a_features):
    from stages.featurize import featurize

    before = sorted(list_keys(moto_s3_client, "Features/"))
    with pytest.raises(
        UsageError, match=r"output s3a://bucket/Features/ already exists.*--overwrite"
    ):
        featurize(s3a_spark, IMAGES, FEATURES, weights="bundled")
    assert sorted(list_keys(moto_s3_client, "Features/")) == before


def test_reduce_missing_s3a_features_is_a_usage_error(s3a_spark, s3a_sample_bucket):
    from stages.reduce import reduce_features

    with pytest.raises(UsageError, match=r"features s3a://bucket/Nope/ do not exist"):
        reduce_features(
            s3a_spark, f"s3a://{BUCKET}/Nope/", f"s3a://{BUCKET}/Out/", k=2, variance=None
        )


def test_featurize_missing_bucket_is_a_usage_error(s3a_spark, s3a_sample_bucket):
    # Regression: S3A's UnknownStoreException used to escape as a Java stack trace.
    from stages.featurize import featurize

    try:
        with pytest.raises(UsageError, match=r"input s3a://nobucket/Test/ does not exist"):
            featurize(s3a_spark, "s3a://nobucket/Test/", f"s3a://{BUCKET}/Out/")
        with pytest.raises(UsageError, match=r"bucket of output s3a://nobucket/Out/ does not"):
            featurize(s3a_spark, f"s3a://{BUCKET}/Test/", "s3a://nobucket/Out/")
    finally:
        close_s3a_filesystem(s3a_spark, "nobucket")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["featurize", f"s3a://{BUCKET}/Nope/", f"s3a://{BUCKET}/Out/"],
            "fruits-pipeline: error: input s3a://bucket/Nope/ does not exist",
        ),
        (
            ["reduce", f"s3a://{BUCKET}/Nope/", f"s3a://{BUCKET}/Out/", "--k", "2"],
            "fruits-pipeline: error: features s3a://bucket/Nope/ do not exist",
        ),
    ],
    ids=["featurize", "reduce"],
)
def test_cli_missing_s3a_prefix_exits_2_with_one_line(
    s3a_spark, s3a_sample_bucket, moto_s3_client, capsys, argv: List[str], message: str
):
    from stages.cli import main

    code = main([*argv, "--quiet"])  # reuses the running session and its S3A settings
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(message), err
    assert list_keys(moto_s3_client, "Out/") == []


def test_cli_process_reads_and_writes_s3a_with_boto3s_endpoint(
    moto_s3_endpoint, moto_s3_client, s3a_sample_bucket, tmp_path
):
    # Regression: s3a:// from `fruits-pipeline` failed with ClassNotFoundException
    # (S3AFileSystem) and a 50-line Java trace; the connector was wired only in tests.
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ)
    env["AWS_ENDPOINT_URL_S3"] = moto_s3_endpoint  # the S3-specific one wins, as in boto3
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    env["FRUITS_LOG_DIR"] = str(tmp_path)
    out = f"s3a://{BUCKET}/CliFeatures/"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "featurize", f"s3a://{BUCKET}/Test/Kiwi/", out,
         "--weights", "random:0", "--alpha", "0.35", "--quiet", "--master", "local[2]"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = read_parquet_from_bucket(moto_s3_client, "CliFeatures/")
    assert table.num_rows == 10 and table.column("error").null_count == 10
    assert set(table.column("label").to_pylist()) == {"Kiwi"}


def test_cli_watch_on_s3_available_now_exits_0(
    moto_s3_client, s3a_spark, s3a_sample_bucket, tmp_path, monkeypatch, capsys
):
    # Regression: the command ended in `KeyError: 'stopped'` (exit 1) after its runs.
    from stages.cli import main

    for key in s3a_sample_bucket[:2]:
        moto_s3_client.copy_object(
            Bucket=BUCKET, Key=f"WatchIn/{key}", CopySource={"Bucket": BUCKET, "Key": key}
        )
    monkeypatch.setenv("FRUITS_LOG_DIR", str(tmp_path))
    argv = [
        "watch",
        f"s3a://{BUCKET}/WatchIn/",
        f"s3a://{BUCKET}/WatchCli/",
        "--weights",
        "bundled",
    ]
    assert main([*argv, "--available-now"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert (report["mode"], report["images"], report["stopped"]) == ("listing", 2, None)


def test_incremental_runs_and_update_on_s3a(moto_s3_client, s3a_spark, s3a_sample_bucket):
    from stages.featurize.incremental import featurize_incremental
    from stages.reduce import reduce_features
    from stages.reduce.update import update_reduce

    features, results = f"s3a://{BUCKET}/Growing/", f"s3a://{BUCKET}/GrowingResults/"
    first = featurize_incremental(s3a_spark, f"{IMAGES}Kiwi/", features)
    reduce_features(s3a_spark, features, results, k=3)
    # A Hadoop glob as INPUT: yesterday's prefix plus today's.
    second = featurize_incremental(s3a_spark, f"{IMAGES}{{Kiwi,Lemon}}/", features)
    assert (first.images, second.new, second.images) == (10, 10, 10)
    keys = list_keys(moto_s3_client, "Growing/")
    assert not [k for k in keys if "_staging" in k or "_temporary" in k]
    records = sorted(k for k in keys if k.startswith("Growing/_runs/"))
    assert records == ["Growing/_runs/00000001.json", "Growing/_runs/00000002.json"]
    runs = [json.loads(moto_s3_client.get_object(Bucket=BUCKET, Key=k)["Body"].read())["run"]
            for k in records]  # fmt: skip
    assert runs == [first.run, second.run]
    table = read_parquet_from_bucket(moto_s3_client, "Growing/run=")
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 20
    summary = update_reduce(s3a_spark, features, results)
    assert summary["update"]["mode"] == "merge" and summary["rows"] == 20
    assert not [k for k in list_keys(moto_s3_client, "GrowingResults/") if "_update" in k]


def test_hidden_names_on_s3_get_their_rows(moto_s3_client, s3a_spark, s3a_sample_bucket):
    # Spark's listing skips `_`/`.` names on S3 too (`_DSC0001.JPG`): one flat listing
    # finds them and they are featurized like the others.
    from stages.featurize import featurize

    data = next(iter(sorted(SAMPLE.glob("Kiwi/*.jpg")))).read_bytes()
    keys = ["Hidden/Kiwi/normal.jpg", "Hidden/Kiwi/_DSC0001.JPG", "Hidden/Kiwi/.dot.jpg",
            "Hidden/_Drafts/x.jpeg"]  # fmt: skip
    for key in keys:
        moto_s3_client.put_object(Bucket=BUCKET, Key=key, Body=data)
    out = f"s3a://{BUCKET}/HiddenFeatures/"
    report = featurize(s3a_spark, f"s3a://{BUCKET}/Hidden/", out, weights="bundled")
    table = read_parquet_from_bucket(moto_s3_client, "HiddenFeatures/")
    got = dict(zip(table.column("path").to_pylist(), table.column("label").to_pylist()))
    assert got == {f"s3a://{BUCKET}/{k}": k.split("/")[-2] for k in keys}
    assert report.images == 4 and report.errors == 0
    assert table.column("error").null_count == 4


def _modified(client, prefix: str) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: (o["LastModified"], o["ETag"]) for o in page.get("Contents", [])})
    return out


def _new_rows(spark, results: str, suffix: str, n: int) -> str:
    """``n`` projected rows of ``results`` under new paths, in a folder of their own (what
    ``watch --results`` projects for one run)."""
    from pyspark.sql import functions as F

    rows = spark.read.parquet(f"{results}/projections").orderBy("path").limit(n)
    rows = rows.withColumn("path", F.concat(F.col("path"), F.lit(suffix)))
    out = f"{results}/new-rows{suffix}"
    rows.coalesce(1).write.parquet(out)
    return out


def test_an_index_on_s3_is_appended_to_without_writing_its_old_files(
    moto_s3_client, s3a_spark, s3a_features, tmp_path, monkeypatch
):
    """``watch --results`` on EMR: RESULTS on S3.  The driver extends a mirror of the index
    and uploads only the new generation's files; a driver without the mirror (a new
    cluster) fetches it once and appends too."""
    import time

    from stages.reduce import reduce_features
    from stages.reduce.index import build_index
    from stages.reduce.index_append import append_index, mirror_folder

    monkeypatch.setenv("FRUITS_CACHE", str(tmp_path / "cache"))
    results = f"s3a://{BUCKET}/ResultsAppend"
    reduce_features(s3a_spark, FEATURES, results, k=5, variance=None, index=False)
    build_index(s3a_spark, results, exact_max_elements=50)  # 100 rows x 5: an IVF index
    first = _modified(moto_s3_client, "ResultsAppend/index/")
    new = _new_rows(s3a_spark, results, "-a.jpg", 3)
    time.sleep(1.1)  # S3's LastModified is in seconds: a file written again would show it
    meta = append_index(s3a_spark, results, new)
    assert meta["generation"] == 2 and meta["rows"] == 103 and meta["kind"] == "faiss-ivf"
    after = _modified(moto_s3_client, "ResultsAppend/index/")
    assert {k: v for k, v in after.items() if "/shards/g00001-" in k} == {
        k: v for k, v in first.items() if "/shards/g00001-" in k
    }
    assert [k for k in after if "/shards/g00002-" in k]
    assert f"ResultsAppend/index/{meta['ivf']['file']}" in after
    remote = json.loads(
        moto_s3_client.get_object(Bucket=BUCKET, Key="ResultsAppend/index/index.json")[
            "Body"
        ].read()
    )
    assert remote["generation"] == 2 and remote["rows"] == 103
    assert remote["shards"] == meta["shards"]

    # A new driver: no mirror yet.  It fetches the index once, then appends.
    mirrors = list((tmp_path / "cache" / "index").iterdir())
    assert len(mirrors) == 1
    shutil.rmtree(mirrors[0])
    meta = append_index(s3a_spark, results, _new_rows(s3a_spark, results, "-b.jpg", 2))
    assert meta["generation"] == 3 and meta["rows"] == 105
    keys = set(list_keys(moto_s3_client, "ResultsAppend/index/"))
    # The IVF file of generation 1 is gone (two behind), 2 and 3 are there.
    assert "ResultsAppend/index/ivf-00001.faiss" not in keys
    assert {"ResultsAppend/index/ivf-00002.faiss", "ResultsAppend/index/ivf-00003.faiss"} <= keys
    # The mirror is an index the app can read: the new rows are found.
    from stages.search.query import SearchIndex

    local = tmp_path / "local"
    shutil.copytree(mirrors[0], local / "index")
    index = SearchIndex(str(local))
    assert len(index) == 105
    paths = {index.path(i) for i in range(100, 105)}
    assert sum(p.endswith("-b.jpg") for p in paths) == 2
    # The mirror holds what index.json names, no more (not generation 2's IVF file).
    assert _held(mirrors[0]) == _named(moto_s3_client, "ResultsAppend/index/index.json")

    # The index rebuilt with the "-a" rows in the projections (other first shards): the
    # next append empties the mirror first; the one mirror of that folder holds the new
    # index's files only.
    s3a_spark.read.parquet(new).write.mode("append").parquet(f"{results}/projections")
    build_index(s3a_spark, results, exact_max_elements=50)
    meta = append_index(s3a_spark, results, _new_rows(s3a_spark, results, "-c.jpg", 2))
    assert (meta["generation"], meta["rows"]) == (2, 105)
    assert list((tmp_path / "cache" / "index").iterdir()) == mirrors
    named = _named(moto_s3_client, "ResultsAppend/index/index.json")
    assert _held(mirrors[0]) == named
    # What an append that died left (a shard, an IVF file): gone at the next one's start.
    (mirrors[0] / "shards" / "g00003-00000").mkdir()
    (mirrors[0] / "ivf-00003.faiss").write_bytes(b"partial")
    assert mirror_folder(s3a_spark, f"{results}/index", meta) == str(mirrors[0])
    assert _held(mirrors[0]) == named


def _held(mirror) -> set:
    """The top-level files and the shards of an index mirror."""
    shards = {f"shards/{p.name}" for p in (mirror / "shards").iterdir()}
    return {p.name for p in mirror.iterdir() if p.name != "shards"} | shards


def _named(client, key: str) -> set:
    """What the ``index.json`` at ``key`` names, and the mirror's own ``mirror.json``."""
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    named = {"index.json", "mirror.json"} | {f"shards/{s['name']}" for s in meta["shards"]}
    return named | ({meta["ivf"]["file"]} if meta.get("ivf") else set())
