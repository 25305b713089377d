"""RowMatrix / KeyedRowMatrix over real RDDs, against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from linalg.distributed import (
    KeyedBlock,
    KeyedRowMatrix,
    RowMatrix,
    aggregate_budget,
    parse_byte_size,
    tree_depth,
)
from linalg.kernels import block_moments, covariance, fit_pca_from_moments


def _blocks(X: np.ndarray, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(X[start : start + s])
        start += s
    return out


def test_statistics_with_more_partitions_than_rows(spark):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 4)) + 100.0
    rdd = spark.sparkContext.parallelize([X[i : i + 1] for i in range(5)], 16)
    assert rdd.getNumPartitions() == 16  # 11 empty partitions
    m = RowMatrix(rdd).compute_moments()
    assert m.n == 5
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        covariance(RowMatrix(rdd).compute_moments()), np.cov(X, rowvar=False), rtol=1e-10
    )


def test_empty_matrix_gives_identity_statistics(spark):
    rdd = spark.sparkContext.parallelize([], 3)
    m = RowMatrix(rdd).compute_moments(n_cols=7)
    assert m.n == 0 and m.mean.shape == (7,)


def test_pca_matches_numpy_correlation_eigh(spark):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    X[:, 4] = 7.0  # a constant column: standardised to 0, its eigenvalue cleaned to 0
    rdd = spark.sparkContext.parallelize(_blocks(X, [50, 0, 70, 80]), 4)
    fit = fit_pca_from_moments(RowMatrix(rdd).compute_moments(), k=3)
    Z = np.delete(X, 4, axis=1)
    w, V = np.linalg.eigh(np.corrcoef(Z, rowvar=False))
    w, V = w[::-1], np.insert(V[:, ::-1], 4, 0.0, axis=0)
    np.testing.assert_allclose(fit.explained_variance_ratio[:5], w / w.sum(), rtol=1e-9)
    assert fit.eigenvalues[5] == 0.0
    pc = fit.components
    cos = np.abs(np.sum(pc * V[:, :3], axis=0))
    assert np.all(cos >= 1 - 1e-9)
    idx = np.argmax(np.abs(pc), axis=0)
    assert np.all(pc[idx, range(3)] > 0)  # deterministic signs


def test_keyed_row_matrix_keeps_each_rows_payload(spark):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 5))
    keys = np.array([f"row {i:02d}" for i in range(30)])
    blocks = [KeyedBlock(X[s : s + 10], keys[s : s + 10]) for s in (0, 10, 20)]
    m = KeyedRowMatrix(spark.sparkContext.parallelize(blocks, 3), n_cols=5)
    fit = fit_pca_from_moments(m.compute_moments(), k=2)
    ref = fit_pca_from_moments(block_moments(X), k=2)
    np.testing.assert_allclose(fit.eigenvalues, ref.eigenvalues, rtol=1e-10)
    with m.project(fit.projection_matrix(), fit.mean) as projected:
        out = projected.blocks.collect()
    P = np.concatenate([b.X for b in out])
    got = np.concatenate([b.keys for b in out])
    order = np.argsort(got)
    np.testing.assert_array_equal(got[order], keys)
    np.testing.assert_allclose(P[order], ref.transform(X), atol=1e-10)


def test_project_centres_then_multiplies(spark):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 4)) + 1e6
    W = rng.standard_normal((4, 2))
    rdd = spark.sparkContext.parallelize(_blocks(X, [5, 7]), 2)
    projected = RowMatrix(rdd).project(W, X.mean(0))
    out = np.concatenate(projected.blocks.collect())
    np.testing.assert_allclose(out, (X - X.mean(0)) @ W, atol=1e-9)
    projected.release()
    # The broadcast is gone: the projected blocks cannot be computed any more.
    with pytest.raises(Exception, match=r"destroyed"):
        projected.blocks.collect()


def test_aggregate_budget_is_half_the_driver_result_size(spark):
    conf = spark.sparkContext.getConf()
    limit = parse_byte_size(conf.get("spark.driver.maxResultSize", "1g")) or 1024**3
    assert aggregate_budget(spark.sparkContext) == limit // 2


class _Conf:
    def __init__(self, value):
        self.value = value

    def get(self, key, default=None):
        assert key == "spark.driver.maxResultSize"
        return default if self.value is None else self.value


class _Context:
    def __init__(self, value):
        self.conf = _Conf(value)

    def getConf(self):
        return self.conf


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 512 * 1024**2), ("0", 512 * 1024**2), ("256m", 128 * 1024**2), ("4g", 2 * 1024**3)],
)
def test_aggregate_budget_follows_max_result_size(value, expected):
    assert aggregate_budget(_Context(value)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1g", 1024**3), ("512m", 512 * 1024**2), ("2048", 2048), ("3KB", 3072), ("0", 0)],
)
def test_parse_byte_size(text, expected):
    assert parse_byte_size(text) == expected


def test_parse_byte_size_refuses_junk():
    with pytest.raises(ValueError, match=r"is not a size such as 1g"):
        parse_byte_size("1.5g")


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["", "b", "k", "kb", "m", "mb", "g", "gb", "t", "tb"]),
)
def test_parse_byte_size_property(n, suffix):
    unit = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[suffix[:1] or ""]
    assert parse_byte_size(f"{n}{suffix.upper() if n % 2 else suffix}") == n * 1024**unit


@pytest.mark.parametrize(
    ("partitions", "size", "expected"),
    [(1, 10, 1), (8, 13_107_200, 1), (200, 13_107_200, 2), (10_000, 13_107_200, 4), (4, 10**9, 2)],
)
def test_tree_depth_follows_aggregate_size(partitions, size, expected):
    assert tree_depth(partitions, size, budget=256 * 1024**2) == expected


@given(
    st.integers(min_value=1, max_value=10**6),
    st.integers(min_value=1, max_value=10**10),
    st.integers(min_value=1, max_value=2**32),
)
def test_tree_depth_keeps_each_level_within_budget(partitions, size, budget):
    depth = tree_depth(partitions, size, budget)
    fan_in = max(2, budget // size)
    # The levels reach one aggregate: fan_in ** depth covers every partition ...
    assert depth >= 1 and fan_in**depth >= partitions
    # ... and the tree is no deeper than that needs.
    assert (
        depth == 1
        or fan_in ** (depth - 1) < partitions
        or math.isclose(math.log(partitions) / math.log(fan_in), depth - 1)
    )
