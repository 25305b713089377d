"""Stage 2 on real features of the bundled sample: Spark ML and numpy agreement,
layout of RESULTS, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.base.errors import UsageError
from stages.featurize import featurize
from stages.reduce import reduce_features
from stages.reduce.pca_model import PCAModel
from tests.conftest import SAMPLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(spark, sample_features, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reduce") / "Results"
    reduce_features(spark, str(sample_features), str(out), k=8, check="spark-ml")
    return out


def _full_rank_features(path: Path, n: int = 400, d: int = 48, seed: int = 7) -> Path:
    """A features table Spark ML's SVD is reliable on: n > d, full rank, separated
    eigenvalues (a few strong factors over noise), float32 like the real ones."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, 4)) * np.array([6.0, 4.0, 2.5, 1.5])
    X = factors @ rng.standard_normal((4, d)) + rng.standard_normal((n, d))
    X = (X * rng.uniform(0.1, 10, d) + rng.uniform(-50, 50, d)).astype(np.float32)
    table = pa.table(
        {
            "path": [f"file:/synthetic/C{i % 5}/{i}.jpg" for i in range(n)],
            "label": [f"C{i % 5}" for i in range(n)],
            "features": pa.array(list(X), pa.list_(pa.float32())),
            "error": pa.array([None] * n, pa.string()),
        }
    )
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-00000.parquet")
    (path / "_SUCCESS").touch()  # committed, as a finished Spark write leaves it
    return path


@pytest.fixture(scope="module")
def full_rank_results(spark, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("full_rank")
    features = _full_rank_features(base / "Features")
    out = base / "Results"
    reduce_features(spark, str(features), str(out), k=6, check="spark-ml")
    return out


def _numpy_reference(features: Path, k: int):
    t = pq.read_table(features).to_pydict()
    X = np.array([f for f, e in zip(t["features"], t["error"]) if e is None], dtype=np.float64)
    paths = [p for p, e in zip(t["path"], t["error"]) if e is None]
    mean = X.mean(0)
    std = X.std(0, ddof=1)
    std[np.ptp(X, axis=0) == 0] = 0.0
    Z = np.where(std > 0, (X - mean) / np.where(std > 0, std, 1.0), 0.0)
    w, V = np.linalg.eigh(np.cov(Z, rowvar=False))
    return X, paths, w[::-1], V[:, ::-1][:, :k], Z


def test_agrees_with_spark_ml_where_spark_ml_is_verified_valid(full_rank_results):
    check = json.loads((full_rank_results / "summary.json").read_text())["spark_ml_check"]
    assert check["spark_ml_valid"] is True, check.get("spark_ml_invalid")
    assert check["spark_lapack"] in ("F2jLAPACK", "JNILAPACK")
    assert check["rows_compared"] == 400 and check["k"] == 6
    assert check["explained_variance_ratio_max_rel_err"] <= 1e-9
    assert check["components_well_separated"] == 6
    assert check["components_min_abs_cos_well_separated"] >= 1 - 1e-9
    assert check["projection_max_abs_diff_over_scale"] <= 1e-8


def test_spark_ml_check_on_rank_deficient_real_features_never_blames_our_pca(results):
    # 100 rows x 1280 features: Spark ML's pure-Java SVD sometimes fails here.  The
    # check either verifies Spark's answer and agrees, or says Spark's answer is
    # invalid, with the reason; it never reports a disagreement with a wrong reference.
    check = json.loads((results / "summary.json").read_text())["spark_ml_check"]
    if check["spark_ml_valid"]:
        assert check["explained_variance_ratio_max_rel_err"] <= 1e-9
        assert check["components_min_abs_cos_well_separated"] >= 1 - 1e-9
        assert check["projection_max_abs_diff_over_scale"] <= 1e-8
    else:
        assert check["spark_ml_invalid"].startswith("Spark ML's PCA returned invalid components")
        assert "rows_compared" not in check


def test_an_invalid_spark_ml_answer_is_named_not_compared(spark, tmp_path, monkeypatch):
    # What F2J's dgesdd does on a rank-deficient covariance, made deterministic:
    # singular values too large, so every explained-variance ratio is too small.
    from pyspark.ml.feature import PCAModel as SparkPCAModel
    from pyspark.ml.linalg import Vectors

    real = SparkPCAModel.explainedVariance
    monkeypatch.setattr(
        SparkPCAModel,
        "explainedVariance",
        property(lambda self: Vectors.dense(real.fget(self).toArray() / 3)),
    )
    features = _full_rank_features(tmp_path / "Features", n=120, d=16)
    summary = reduce_features(spark, str(features), str(tmp_path / "R"), k=3, check="spark-ml")
    check = summary["spark_ml_check"]
    assert check["spark_ml_valid"] is False
    assert "its LAPACK SVD failed" in check["spark_ml_invalid"]
    assert "component 1 claims" in check["spark_ml_invalid"]
    assert "explained_variance_ratio_max_rel_err" not in check


def test_agrees_with_numpy_and_keeps_path_and_label(results, sample_features):
    X, paths, w, V, Z = _numpy_reference(sample_features, 8)
    assert (np.ptp(X, axis=0) == 0).sum() > 0  # all-zero columns: normal on small samples
    model = PCAModel.load(str(results))
    np.testing.assert_allclose(model.pca_fit.eigenvalues[:8], w[:8], rtol=1e-9)
    cos = np.abs(np.sum(model.pca_fit.components * V, axis=0))
    assert cos.min() >= 1 - 1e-9
    proj = pq.read_table(results / "projections").to_pydict()
    assert sorted(proj["path"]) == sorted(paths)
    for p, lab in zip(proj["path"], proj["label"]):
        assert p.split("/")[-2] == lab
    ours = np.array(proj["pca"])
    order = [paths.index(p) for p in proj["path"]]
    ref = Z[order] @ V
    signs = np.sign(np.sum(ours * ref, axis=0))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours * signs, ref, atol=1e-8 * scale)
    # The saved model projects the raw features to the same numbers.
    np.testing.assert_allclose(model.transform(X[order]), ours, atol=1e-10 * scale)


def test_results_layout_and_summary(results):
    assert (results / "projections" / "_SUCCESS").exists()
    assert {p.name for p in (results / "pca_model").iterdir()} >= {"arrays.npz", "model.json"}
    s = json.loads((results / "summary.json").read_text())
    assert s["rows"] == 100 and s["error_rows"] == 0 and s["k"] == 8 and s["n_features"] == 1280
    assert 0 < s["cumulative_explained_variance"] < 1
    assert s["features_model"]["alpha"] == 0.35
    assert set(s["timings_s"]) >= {"read_and_statistics", "eigh", "project_and_write"}


def test_variance_picks_the_smallest_k(spark, sample_features, tmp_path):
    s = reduce_features(spark, str(sample_features), str(tmp_path / "R"), variance=0.5)
    ratios = np.array(s["explained_variance_ratio"])
    assert ratios.sum() >= 0.5 and ratios[:-1].sum() < 0.5


def test_more_partitions_than_rows_and_error_rows_skipped(spark, sample_features, tmp_path):
    # 5 good rows + 2 error rows spread over 12 files / partitions.
    t = pq.read_table(sample_features).slice(0, 7)
    err = pa.array([None] * 5 + ["cannot decode image", "empty file (0 bytes)"], pa.string())
    feats = pa.array(t["features"].to_pylist()[:5] + [None, None], t.schema.field("features").type)
    t = t.set_column(t.schema.get_field_index("error"), "error", err)
    t = t.set_column(t.schema.get_field_index("features"), "features", feats)
    src = tmp_path / "F"
    src.mkdir()
    for i in range(7):
        pq.write_table(t.slice(i, 1), src / f"part-{i:05d}.parquet")
    for i in range(7, 12):
        pq.write_table(t.slice(0, 0), src / f"part-{i:05d}.parquet")
    (src / "_SUCCESS").touch()
    s = reduce_features(spark, str(src), str(tmp_path / "R"), k=3)
    assert s["rows"] == 5 and s["error_rows"] == 2 and s["k"] == 3
    assert len(pq.read_table(tmp_path / "R" / "projections")) == 5


def _expect_refusal(spark, features, results: Path, match: str, **kw):
    with pytest.raises(UsageError, match=match):
        reduce_features(spark, str(features), str(results), **kw)
    assert not results.exists()  # nothing written


def test_bad_arguments_are_refused_with_nothing_written(spark, sample_features, tmp_path):
    r = tmp_path / "R"
    _expect_refusal(spark, sample_features, r, r"--k 0 must be at least 1", k=0)
    _expect_refusal(
        spark, sample_features, r, r"--k 1281 must be between 1 and the feature length 1280", k=1281
    )
    _expect_refusal(spark, sample_features, r, r"--variance 1.5 must be in \(0, 1\]", variance=1.5)
    _expect_refusal(spark, sample_features, r, r"--variance 0.0 must be in \(0, 1\]", variance=0.0)
    _expect_refusal(
        spark, tmp_path / "nope", r, r"do not exist: run `fruits-pipeline featurize", k=2
    )
    (tmp_path / "empty").mkdir()
    _expect_refusal(spark, tmp_path / "empty", r, r"hold no Parquet files", k=2)


def test_bad_features_are_refused(spark, sample_features, tmp_path):
    r = tmp_path / "R"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.table({"path": ["a"], "vec": [[1.0, 2.0]]}), wrong / "part-0.parquet")
    (wrong / "_SUCCESS").touch()
    _expect_refusal(spark, wrong, r, r"not a features table: no column label, features, error", k=1)

    t = pq.read_table(sample_features).slice(0, 4)
    feats = t["features"].to_pylist()
    feats[1] = feats[1][:640]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(
        t.set_column(
            t.schema.get_field_index("features"),
            "features",
            pa.array(feats, t.schema.field("features").type),
        ),
        mixed / "part-0.parquet",
    )
    (mixed / "_SUCCESS").touch()
    _expect_refusal(spark, mixed, r, r"mix vectors of lengths 640, 1280", k=1)

    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(t.slice(0, 1), one / "part-0.parquet")
    (one / "_SUCCESS").touch()
    _expect_refusal(spark, one, r, r"have 1 usable rows .* a PCA needs at least 2", k=1)


def test_features_from_two_models_are_refused(spark, sample_features, tmp_path):
    other = tmp_path / "other"
    featurize(spark, str(SAMPLE / "Kiwi"), str(other), weights="random:3", alpha=0.35)
    both = tmp_path / "both"
    shutil.copytree(sample_features, both)
    for i, f in enumerate(sorted(other.glob("*.parquet"))):
        shutil.copy(f, both / f"part-other-{i}.parquet")
    _expect_refusal(
        spark, both, tmp_path / "R", r"made by 2 different models .* one --weights", k=2
    )


def test_rerun_without_overwrite_refuses(spark, sample_features, results):
    before = (results / "summary.json").read_text()
    with pytest.raises(UsageError, match="already exists: pass --overwrite"):
        reduce_features(spark, str(sample_features), str(results), k=3)
    assert (results / "summary.json").read_text() == before


def test_component_agreement_aligns_signs_and_measures_the_angle():
    from linalg.kernels import block_moments, fit_pca_from_moments
    from stages.reduce.sparkml import component_agreement

    rng = np.random.default_rng(4)
    X = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    fit = fit_pca_from_moments(block_moments(X), k=3)
    pc = fit.components[:, :3] * np.array([1.0, -1.0, 1.0])  # another answer's signs
    agreement, signs = component_agreement(fit, pc, fit.explained_variance_ratio[:3])
    np.testing.assert_array_equal(signs, [1.0, -1.0, 1.0])
    assert agreement["components_min_abs_cos_all"] == pytest.approx(1.0, abs=1e-12)
    assert agreement["explained_variance_ratio_max_rel_err"] == 0.0
    turned = pc.copy()
    turned[:, 0] = (pc[:, 0] + pc[:, 1]) / np.sqrt(2)  # 45 degrees off in one component
    agreement, _ = component_agreement(fit, turned, fit.explained_variance_ratio[:3])
    assert agreement["components_min_abs_cos_all"] == pytest.approx(np.sqrt(0.5), abs=1e-9)
