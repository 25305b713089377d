"""``reduce --update``: the saved moments plus the new rows equal a full reduce."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.base.errors import UsageError
from stages.cli import main
from stages.featurize.incremental import featurize_incremental
from stages.reduce import reduce_features
from stages.reduce.pca_model import PCAModel
from stages.reduce.update import update_reduce
from tests.conftest import SAMPLE, copy_images

pytestmark = pytest.mark.slow

FILES = sorted(SAMPLE.glob("*/*.jpg"))


def _projections(results: Path) -> dict:
    t = pq.read_table(results / "projections").to_pydict()
    assert len(set(t["path"])) == len(t["path"])
    return {p: np.asarray(v) for p, v in zip(t["path"], t["pca"])}


def assert_same_pca(updated: Path, full: Path) -> None:
    """Eigenvalues rtol 1e-9, |cos| >= 1 - 1e-9, projections equal after sign alignment."""
    a, b = PCAModel.load(str(updated)), PCAModel.load(str(full))
    assert a.pca_fit.n_samples == b.pca_fit.n_samples and a.n_components_ == b.n_components_
    wa, wb = a.pca_fit.eigenvalues, b.pca_fit.eigenvalues
    np.testing.assert_allclose(wa, wb, rtol=1e-9, atol=1e-12 * wb[0])
    k = a.n_components_
    gaps = np.minimum(np.abs(np.diff(wb, prepend=np.inf)), np.abs(np.diff(wb, append=-np.inf)))
    separated = (gaps > 1e-6 * wb[0])[:k]
    assert separated.sum() >= k - 1
    dots = np.sum(a.pca_fit.components * b.pca_fit.components, axis=0)
    assert np.abs(dots)[separated].min() >= 1 - 1e-9
    np.testing.assert_allclose(a.m2, b.m2, rtol=1e-9, atol=1e-9 * np.abs(b.m2).max())
    pa_, pb = _projections(updated), _projections(full)
    assert set(pa_) == set(pb)
    signs = np.sign(dots)
    scale = max(np.abs(v).max() for v in pb.values())
    diff = max(np.abs(pa_[p] * signs - pb[p])[separated].max() for p in pb)
    assert diff <= 1e-8 * scale


@pytest.fixture(scope="module")
def growing(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("update")
    bucket, features = root / "Test", root / "Features"
    copy_images(FILES[:40], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    reduce_features(spark, str(features), str(root / "Results"), k=6)
    copy_images(FILES[40:70], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    return root, bucket, features


def test_update_merges_only_the_new_rows_and_equals_a_full_reduce(spark, growing):
    root, _, features = growing
    summary = update_reduce(spark, str(features), str(root / "Results"))
    assert summary["update"]["mode"] == "merge" and summary["update"]["new_files"] >= 1
    assert summary["rows"] == 70 and summary["k"] == 6
    reduce_features(spark, str(features), str(root / "Full"), k=6)
    assert_same_pca(root / "Results", root / "Full")
    assert json.loads((root / "Results" / "summary.json").read_text())["update"]["mode"] == "merge"
    assert not (root / "Results" / "_update").exists()
    # The search index follows the updated PCA: 70 rows, built on the new arrays.
    index = json.loads((root / "Results" / "index" / "index.json").read_text())
    arrays = (root / "Results" / "pca_model" / "arrays.npz").read_bytes()
    assert index["rows"] == 70
    assert index["pca_arrays_sha256"] == hashlib.sha256(arrays).hexdigest()
    # Nothing new since: nothing rewritten.
    before = (root / "Results" / "pca_model" / "arrays.npz").stat().st_mtime_ns
    again = update_reduce(spark, str(features), str(root / "Results"))
    assert again["update"]["mode"] == "none"
    assert (root / "Results" / "pca_model" / "arrays.npz").stat().st_mtime_ns == before


def test_update_after_a_prune_falls_back_to_a_full_pass(spark, growing):
    root, bucket, features = growing
    for f in FILES[:3]:
        (bucket / f.parent.name / f.name).unlink()
    featurize_incremental(spark, str(bucket), str(features), prune=True)
    summary = update_reduce(spark, str(features), str(root / "Results"), variance=0.8)
    assert summary["update"]["mode"] == "full" and "not exact" in summary["update"]["reason"]
    reduce_features(spark, str(features), str(root / "Full2"), variance=0.8)
    assert_same_pca(root / "Results", root / "Full2")
    assert summary["rows"] == 67


def test_update_refuses_options_it_would_ignore(tmp_path):
    # Checked before any Spark job: no session needed.
    for kwargs in ({"index": False}, {"featurize_report": {"images": 1}}):
        with pytest.raises(UsageError, match="update=True keeps RESULTS whole"):
            reduce_features(None, str(tmp_path / "F"), str(tmp_path / "R"), update=True, **kwargs)


def test_update_needs_a_saved_model_or_no_results_at_all(spark, growing, tmp_path):
    _, _, features = growing
    (tmp_path / "Other").mkdir()
    (tmp_path / "Other" / "notes.txt").write_text("not a RESULTS folder")
    with pytest.raises(UsageError, match="holds no pca_model: run `fruits-pipeline reduce"):
        update_reduce(spark, str(features), str(tmp_path / "Other"))
    first = update_reduce(spark, str(features), str(tmp_path / "New"), k=3)
    assert first["update"]["mode"] == "full" and first["k"] == 3
    assert PCAModel.load(str(tmp_path / "New")).m2 is not None


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["featurize", "IN", "OUT", "--prune"], "--prune only works with --incremental"),
        (["featurize", "IN", "OUT", "--incremental", "--overwrite"], "drop --overwrite"),
        (["reduce", "F", "R", "--update", "--overwrite"], "drop --overwrite"),
        (["watch", "IN", "F", "--trigger", "soon"], "is not a duration"),
    ],
)
def test_growing_options_refused_before_spark_starts(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as exc:  # refused by argparse itself (a value no option takes)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_a_plain_table_moved_into_its_first_run_keeps_the_model_current(
    spark, sample_features, tmp_path
):
    features = tmp_path / "Features"
    shutil.copytree(sample_features, features)
    reduce_features(spark, str(features), str(tmp_path / "Results"), k=4)
    report = featurize_incremental(spark, str(SAMPLE), str(features))  # moves the files
    assert report.images == 0 and not list(features.glob("*.parquet"))
    summary = update_reduce(spark, str(features), str(tmp_path / "Results"))
    assert summary["update"]["mode"] == "none" and summary["rows"] == 100
