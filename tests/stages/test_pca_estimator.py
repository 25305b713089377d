"""The reduce's PCA as an estimator (``stages.reduce.pca.PCA``) and its fitted model
(``stages.reduce.pca_model.PCAModel``), against numpy's own standardise-then-eigh.

The tests without the ``spark`` fixture (parameters, ``fit_moments``, save/load,
a model saved by the previous version) need no JVM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from linalg.kernels import block_moments
from stages.base.errors import UsageError
from stages.reduce.pca import PCA
from stages.reduce.pca_model import PCAModel

MAIN_RESULTS = Path(__file__).parent / "data" / "main_results"


def numpy_pca(X: np.ndarray):
    """Standardise (unbiased std, constant columns to 0) then eigh of the covariance:
    mean, std, descending eigenvalues, eigenvectors as rows with each row's
    largest-|x| entry positive, and the ratios."""
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(0)
    std = X.std(0, ddof=1)
    std[np.ptp(X, axis=0) == 0] = 0.0
    Z = np.where(std > 0, (X - mean) / np.where(std > 0, std, 1.0), 0.0)
    w, V = np.linalg.eigh(np.atleast_2d(np.cov(Z, rowvar=False)))
    w, V = w[::-1], V[:, ::-1].T
    idx = np.argmax(np.abs(V), axis=1)
    V = V * np.sign(V[np.arange(len(V)), idx])[:, None]
    trace = float(np.count_nonzero(std > 0))
    return mean, std, w, V, (w / trace if trace else np.zeros_like(w))


def standardised_projection(model: PCAModel, X: np.ndarray) -> np.ndarray:
    """``((X - mean_) / scale_) @ components_.T``, columns with ``scale_ == 0`` to 0."""
    s = model.scale_
    Z = np.where(s > 0, (np.asarray(X, np.float64) - model.mean_) / np.where(s > 0, s, 1.0), 0.0)
    return Z @ model.components_.T


def assert_matches_numpy(model: PCAModel, X: np.ndarray, rtol: float = 1e-9) -> None:
    """Every scikit-learn attribute equals numpy's on the same rows."""
    mean, std, w, V, ratio = numpy_pca(X)
    k = model.n_components_
    n, d = X.shape
    assert (model.n_samples_, model.n_features_in_) == (n, d)
    assert model.components_.shape == (k, d)
    assert model.explained_variance_.shape == model.explained_variance_ratio_.shape == (k,)
    np.testing.assert_allclose(model.mean_, mean, rtol=rtol, atol=rtol * np.abs(mean).max())
    np.testing.assert_allclose(model.scale_, std, rtol=1e-7)
    top = max(1.0, float(w[0]))
    np.testing.assert_allclose(model.explained_variance_, w[:k], rtol=0, atol=1e-9 * top)
    np.testing.assert_allclose(model.explained_variance_ratio_, ratio[:k], rtol=0, atol=1e-9)
    C = model.components_
    np.testing.assert_allclose(C @ C.T, np.eye(k), atol=1e-10)  # orthonormal rows
    # An eigenvector is unique (up to the sign rule) only where its eigenvalue is apart.
    gaps = np.minimum(np.abs(np.diff(w, prepend=np.inf)), np.abs(np.diff(w, append=-np.inf)))
    for j in range(k):
        if gaps[j] > 1e-6 * top:
            a = np.sort(np.abs(V[j]))[::-1]
            # The sign rule picks the largest |x|; a tie (up to rounding) leaves the sign free.
            sign = 1.0 if len(a) == 1 or a[0] - a[1] > 1e-9 else np.sign(C[j] @ V[j])
            np.testing.assert_allclose(C[j], sign * V[j], rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        model.transform(X), standardised_projection(model, X), rtol=0, atol=1e-9 * top
    )


# ---------------------------------------------------------------- no JVM


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"k": 2, "variance": 0.5}, r"give --k or --variance, not both"),
        ({"k": 0}, r"--k 0 must be at least 1"),
        ({"variance": 1.5}, r"--variance 1.5 must be in \(0, 1\]"),
        ({"variance": 0.0}, r"--variance 0.0 must be in \(0, 1\]"),
    ],
)
def test_bad_parameters_are_refused_when_the_estimator_is_made(kw, match):
    with pytest.raises(UsageError, match=match):
        PCA(**kw)


def test_default_is_95_percent_of_the_variance():
    assert PCA().requested == {"k": None, "variance": 0.95}
    assert PCA(k=3).requested == {"k": 3, "variance": None}


# Integer-valued rows: moments are exact, constant columns and rank deficiency
# (n <= d) come up often.
ROWS = st.integers(2, 12).flatmap(
    lambda n: st.integers(1, 6).flatmap(
        lambda d: arrays(np.float64, (n, d), elements=st.integers(-20, 20).map(float))
    )
)


@settings(max_examples=80, deadline=None)
@given(ROWS, st.integers(1, 6))
def test_fit_moments_of_any_matrix_equals_numpy(X, k):
    n, d = X.shape
    k = min(k, d)
    rank = min(n - 1, int(np.count_nonzero(np.ptp(X, axis=0) > 0)))
    pca = PCA(k=k)
    if k > rank:
        with pytest.raises(UsageError, match=rf"--k {k} is above the rank {rank}"):
            pca.fit_moments(block_moments(X))
        return
    model = pca.fit_moments(block_moments(X), {"name": "x"}, {"rows_total": n})
    assert model.n_components_ == k
    assert (model.features_model, model.statistics) == ({"name": "x"}, {"rows_total": n})
    np.testing.assert_array_equal(model.m2, block_moments(X).m2)  # kept for updates
    assert_matches_numpy(model, X)


def test_a_hand_computed_fit():
    # Two perfectly correlated columns: mean (2, 4), std (1, 2), correlation all ones,
    # eigenvalues 2 and 0, first component (1, 1) / sqrt(2).
    X = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    model = PCA(k=1).fit_moments(block_moments(X))
    np.testing.assert_allclose(model.mean_, [2.0, 4.0], rtol=1e-15)
    np.testing.assert_allclose(model.scale_, [1.0, 2.0], rtol=1e-15)
    np.testing.assert_allclose(model.components_, [[0.5**0.5, 0.5**0.5]], rtol=1e-15)
    np.testing.assert_allclose(model.explained_variance_, [2.0], rtol=1e-15)
    np.testing.assert_allclose(model.explained_variance_ratio_, [1.0], rtol=1e-15)
    np.testing.assert_allclose(model.transform(X), [[-(2**0.5)], [0.0], [2**0.5]], atol=1e-15)


def test_fit_moments_refuses_k_above_the_feature_length():
    X = np.arange(12.0).reshape(4, 3) ** 2
    with pytest.raises(UsageError, match=r"--k 4 must be between 1 and the feature length 3"):
        PCA(k=4).fit_moments(block_moments(X))


def test_variance_picks_the_smallest_k_from_moments():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 4)) @ np.diag([5.0, 2.0, 1.0, 0.1]) @ rng.standard_normal((4, 6))
    model = PCA(variance=0.9).fit_moments(block_moments(X))
    cum = np.cumsum(numpy_pca(X)[4])
    assert model.n_components_ == int(np.searchsorted(cum, 0.9 - 1e-12) + 1)
    assert model.explained_variance_ratio_.sum() >= 0.9


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((30, 6)) * [1, 2, 3, 4, 5, 6] + 10
    stats = {"files": ["a.parquet"], "rows_total": 31, "error_rows": 1}
    model = PCA(k=4).fit_moments(block_moments(X), {"name": "m", "alpha": 0.35}, stats)
    uri = model.save(str(tmp_path / "Results"))
    assert uri.endswith("Results/pca_model")
    assert sorted(p.name for p in (tmp_path / "Results" / "pca_model").iterdir()) == [
        "arrays.npz",
        "model.json",
    ]
    for where in ("Results", "Results/pca_model"):
        back = PCAModel.load(str(tmp_path / where))
        for attr in ("mean_", "scale_", "components_", "explained_variance_", "m2"):
            np.testing.assert_array_equal(getattr(back, attr), getattr(model, attr))
        np.testing.assert_array_equal(back.pca_fit.eigenvalues, model.pca_fit.eigenvalues)
        assert (back.n_components_, back.n_samples_, back.n_features_in_) == (4, 30, 6)
        assert back.statistics == stats and back.features_model == {"name": "m", "alpha": 0.35}
        np.testing.assert_array_equal(back.transform(X), model.transform(X))
    # Saving into .../pca_model itself writes there, so load(path) reads what save(path) wrote.
    model.save(str(tmp_path / "Other" / "pca_model"))
    assert (tmp_path / "Other" / "pca_model" / "model.json").is_file()
    # Only a folder named pca_model: RESULTS named run_pca_model still gets its own.
    model.save(tmp_path / "run_pca_model")
    assert (tmp_path / "run_pca_model" / "pca_model" / "model.json").is_file()
    with pytest.raises(TypeError, match=r"expected the RESULTS path first, got dict"):
        model.save({"spark": "session"})  # the old save(spark, path) order


def test_a_model_saved_by_the_previous_version_loads(tmp_path):
    # tests/stages/data/main_results/pca_model was written by PCAModel.save before the
    # estimator existed (12 rows of rows.txt, k=3, a constant column): same format.
    X = np.loadtxt(MAIN_RESULTS / "rows.txt")
    model = PCAModel.load(str(MAIN_RESULTS))
    assert model.n_components_ == 3 and model.scale_[2] == 0.0
    assert_matches_numpy(model, X)
    assert model.statistics["requested"] == {"k": 3, "variance": None}
    np.testing.assert_allclose(model.moments.m2, block_moments(X).m2, rtol=1e-12, atol=1e-9)
    # Written again, the metadata is byte for byte what the previous version wrote.
    model.save(str(tmp_path))
    old = (MAIN_RESULTS / "pca_model" / "model.json").read_bytes()
    assert (tmp_path / "pca_model" / "model.json").read_bytes() == old
    # The constant column maps to 0 whatever a new row holds there.
    Y = X[:2].copy()
    Y[:, 2] = [0.0, 1e6]
    np.testing.assert_array_equal(model.transform(Y), model.transform(X[:2]))


# ---------------------------------------------------------------- on Spark


def _frame(spark, X: np.ndarray, errors=(), partitions: int = 3, spec=None):
    """A features DataFrame (the stage-1 schema) of rows ``X`` plus error rows."""
    from stages.base.contract import METADATA_KEY, features_schema

    schema = features_schema()
    if spec is not None:
        schema["features"].metadata = {METADATA_KEY: spec}
    rows = [
        (f"file:/x/C{i % 3}/{i}.jpg", f"C{i % 3}", [float(v) for v in x], None, None)
        for i, x in enumerate(X.astype(np.float32))
    ]
    rows += [(f"file:/x/bad/{i}.jpg", "bad", None, reason, None) for i, reason in enumerate(errors)]
    return spark.createDataFrame(rows, schema).repartition(partitions)


def _collect(df) -> dict:
    return {r["path"]: np.array(r["pca"]) for r in df.collect()}


def test_fit_and_transform_a_random_dataframe(spark):
    from stages.reduce.feature_matrix import PROJECTIONS_SCHEMA

    rng = np.random.default_rng(11)
    X = (rng.standard_normal((37, 7)) @ rng.standard_normal((7, 7)) * 4 + 50).astype(np.float32)
    df = _frame(spark, X, errors=["cannot decode image", "empty file (0 bytes)"])
    model = PCA(k=4).fit(df)
    assert_matches_numpy(model, X.astype(np.float64), rtol=1e-7)
    assert model.statistics == {
        "rows_total": 39,
        "error_rows": 2,
        "requested": {"k": 4, "variance": None},
    }
    out = model.transform(df)
    assert out.schema == spark.createDataFrame([], PROJECTIONS_SCHEMA).schema
    got = _collect(out)
    expected = model.transform(X)
    assert sorted(got) == sorted(f"file:/x/C{i % 3}/{i}.jpg" for i in range(37))  # no error row
    for i in range(37):
        np.testing.assert_allclose(got[f"file:/x/C{i % 3}/{i}.jpg"], expected[i], atol=1e-9)


def test_projected_releases_its_broadcast_at_the_end_of_the_block(spark):
    import os

    rng = np.random.default_rng(12)
    X = rng.standard_normal((20, 6))
    df = _frame(spark, X, partitions=2)
    model = PCA(k=3).fit(df)
    temp = spark.sparkContext._temp_dir  # where pyspark keeps a broadcast's driver-side file

    def files() -> set:
        return set(os.listdir(temp))

    before = files()
    for _ in range(3):  # a watch: one projection per micro-batch
        with model.projected(df) as projected:
            got = _collect(projected)
            assert files() - before  # the block's broadcast exists while it runs
    assert files() == before
    expected = model.transform(X.astype(np.float32))  # the DataFrame holds float32
    for i in range(20):
        np.testing.assert_allclose(got[f"file:/x/C{i % 3}/{i}.jpg"], expected[i], atol=1e-9)


def test_fit_refuses_k_above_the_length_or_the_rank(spark):
    X = np.random.default_rng(2).standard_normal((4, 7))
    df = _frame(spark, X, partitions=2)
    with pytest.raises(UsageError, match=r"--k 9 must be between 1 and the feature length 7"):
        PCA(k=9).fit(df)
    with pytest.raises(UsageError, match=r"--k 4 is above the rank 3 of these features \(4 rows"):
        PCA(k=4).fit(df)
    with pytest.raises(UsageError, match=r"not a features table: no column error"):
        PCA(k=1).fit(df.drop("error"))


def test_transform_refuses_features_of_another_length_or_model(spark):
    X = np.random.default_rng(4).standard_normal((10, 5))
    model = PCA(k=2).fit_moments(block_moments(X), {"name": "a", "weights_sha256": "1" * 64})
    with pytest.raises(Exception, match=r"this model takes vectors of length 5"):
        model.transform(_frame(spark, X[:, :4], partitions=1)).collect()
    other = _frame(spark, X, spec={"name": "a", "weights_sha256": "2" * 64})
    with pytest.raises(UsageError, match=r"made by another model .* same --weights"):
        model.transform(other)


@pytest.mark.slow
def test_reduce_is_the_estimator_on_real_features(spark, sample_features, tmp_path):
    from stages.base.contract import read_model_spec
    from stages.reduce import reduce_features

    t = pq.read_table(sample_features).to_pydict()
    good = [i for i, e in enumerate(t["error"]) if e is None]
    X = np.array([t["features"][i] for i in good], dtype=np.float64)
    paths = [t["path"][i] for i in good]

    model = PCA(k=5).fit(str(sample_features))
    assert_matches_numpy(model, X, rtol=1e-7)
    df = spark.read.parquet(str(sample_features))
    assert model.features_model == read_model_spec(df.schema)
    files = sorted(p.name for p in Path(sample_features).glob("*.parquet"))
    assert model.statistics["files"] == files
    same = PCA(k=5).fit(df)  # the DataFrame of the same Parquet: the same fit
    np.testing.assert_allclose(same.components_, model.components_, atol=1e-12)
    assert "files" not in same.statistics

    s = reduce_features(spark, str(sample_features), str(tmp_path / "R"), k=5, index=False)
    saved = PCAModel.load(str(tmp_path / "R"))
    np.testing.assert_allclose(saved.components_, model.components_, atol=1e-12)
    np.testing.assert_allclose(saved.mean_, model.mean_, rtol=1e-12)
    assert saved.statistics == model.statistics
    assert s["explained_variance_ratio"] == pytest.approx(model.explained_variance_ratio_.tolist())

    # transform(DataFrame) gives the rows reduce wrote, and both equal the array transform.
    written = _collect(spark.read.parquet(str(tmp_path / "R" / "projections")))
    got = _collect(model.transform(df))
    expected = dict(zip(paths, model.transform(X)))
    assert sorted(got) == sorted(written) == sorted(expected)
    for p in paths:
        np.testing.assert_allclose(got[p], expected[p], rtol=0, atol=1e-9)
        np.testing.assert_allclose(written[p], expected[p], rtol=0, atol=1e-9)
