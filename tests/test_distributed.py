"""RowMatrix / IndexedRowMatrix over real RDDs, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from linalg.distributed import IndexedBlock, IndexedRowMatrix, RowMatrix, tree_depth
from linalg.kernels import block_moments, fit_pca_from_moments


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
    m = RowMatrix(rdd).compute_column_summary_statistics()
    assert m.n == 5
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        RowMatrix(rdd).compute_covariance(), np.cov(X, rowvar=False), rtol=1e-10
    )


def test_empty_matrix_gives_identity_statistics(spark):
    rdd = spark.sparkContext.parallelize([], 3)
    m = RowMatrix(rdd).compute_column_summary_statistics(n_cols=7)
    assert m.n == 0 and m.mean.shape == (7,)


def test_principal_components_match_numpy(spark):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    rdd = spark.sparkContext.parallelize(_blocks(X, [50, 0, 70, 80]), 4)
    pc, ratio = RowMatrix(rdd).compute_principal_components_and_explained_variance(3)
    w, V = np.linalg.eigh(np.cov(X, rowvar=False))
    w, V = w[::-1], V[:, ::-1]
    np.testing.assert_allclose(ratio, (w / w.sum())[:3], rtol=1e-9)
    cos = np.abs(np.sum(pc * V[:, :3], axis=0))
    assert np.all(cos >= 1 - 1e-9)
    idx = np.argmax(np.abs(pc), axis=0)
    assert np.all(pc[idx, range(3)] > 0)  # deterministic signs


def test_indexed_row_matrix_keeps_index_and_payload(spark):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 5))
    labels = np.array([f"class {i % 3}" for i in range(30)])
    blocks = [
        IndexedBlock(np.arange(s, s + 10, dtype=np.int64), X[s : s + 10], labels[s : s + 10])
        for s in (0, 10, 20)
    ]
    m = IndexedRowMatrix(spark.sparkContext.parallelize(blocks, 3), n_cols=5)
    fit = m.compute_pca(k=2)
    ref = fit_pca_from_moments(block_moments(X), k=2)
    np.testing.assert_allclose(fit.eigenvalues, ref.eigenvalues, rtol=1e-10)
    out = m.multiply(fit.projection_matrix(), fit.mean).blocks.collect()
    index = np.concatenate([b.index for b in out])
    P = np.concatenate([b.X for b in out])
    keys = np.concatenate([b.keys for b in out])
    order = np.argsort(index)
    np.testing.assert_array_equal(index[order], np.arange(30))
    np.testing.assert_array_equal(keys[order], labels)
    np.testing.assert_allclose(P[order], ref.transform(X), atol=1e-10)


def test_multiply_broadcasts_and_projects(spark):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 4))
    W = rng.standard_normal((4, 2))
    rdd = spark.sparkContext.parallelize(_blocks(X, [5, 7]), 2)
    out = np.concatenate(RowMatrix(rdd).multiply(W, X.mean(0)).blocks.collect())
    np.testing.assert_allclose(out, (X - X.mean(0)) @ W, atol=1e-12)


@pytest.mark.parametrize(
    ("partitions", "size", "expected"),
    [(1, 10, 1), (8, 13_107_200, 1), (200, 13_107_200, 2), (10_000, 13_107_200, 4), (4, 10**9, 2)],
)
def test_tree_depth_follows_aggregate_size(partitions, size, expected):
    assert tree_depth(partitions, size) == expected
