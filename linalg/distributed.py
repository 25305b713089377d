"""Distributed matrices over Spark RDDs of numpy row blocks.

``RowMatrix`` is an RDD of 2-d float blocks (one or more per partition) and
``IndexedRowMatrix`` an RDD of :class:`IndexedBlock` whose rows carry a stable
int64 index and an opaque per-row payload (the reduce stage keeps each row's
``path`` and ``label`` there), so a projection keeps track of its rows without a
join.  The pure kernels of :mod:`linalg.kernels` do the arithmetic; this module
only moves blocks around.

Methods named ``compute_*`` launch a Spark job; each docstring states its passes
over the data and its memory on the executors and on the driver (``d`` is the
number of columns, ``b`` the rows of the largest block, ``P`` the partitions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from linalg.kernels import (
    BlockMoments,
    PCAFit,
    block_moments,
    correlation_from_covariance,
    covariance,
    eigh_descending,
    fit_pca_from_moments,
    merge_moments,
    project,
)

__all__ = ["IndexedBlock", "RowMatrix", "IndexedRowMatrix", "tree_depth"]

# What one treeAggregate level may send to one reducer (and, at the top, to the driver).
_AGGREGATE_BUDGET_BYTES = 256 * 1024 * 1024


def tree_depth(
    n_partitions: int, aggregate_bytes: int, budget: int = _AGGREGATE_BUDGET_BYTES
) -> int:
    """``treeAggregate`` depth from the aggregate's size.

    Each level merges at most ``budget / aggregate_bytes`` aggregates (and never
    fewer than 2), so neither an executor nor the driver receives more than the
    budget at once: ``depth = ceil(log(P) / log(fan_in))``, at least 1.
    """
    if n_partitions <= 1:
        return 1
    fan_in = max(2, budget // max(1, aggregate_bytes))
    if fan_in >= n_partitions:
        return 1
    return max(1, math.ceil(math.log(n_partitions) / math.log(fan_in)))


def _merge_optional(a: Optional[BlockMoments], b: Optional[BlockMoments]) -> Optional[BlockMoments]:
    # None is the zero value: it costs nothing to ship and leaves d unknown until
    # the first non-empty block (empty partitions stay identities).
    if a is None:
        return b
    if b is None:
        return a
    return merge_moments(a, b)


@dataclass
class IndexedBlock:
    """A block of rows with their stable indices and a per-row payload.

    Attributes
    ----------
    index : ndarray of shape (n_rows,), int64
    X : ndarray of shape (n_rows, n_cols)
    keys : object, optional
        Carried along untouched (e.g. a pyarrow table of ``path`` and ``label``).
    """

    index: np.ndarray
    X: np.ndarray
    keys: Any = None

    def __len__(self) -> int:
        return int(self.X.shape[0])


class RowMatrix:
    """A row-oriented distributed matrix: an RDD of 2-d numpy blocks.

    Parameters
    ----------
    blocks : pyspark.RDD of ndarray
        Blocks of shape (n_i, n_cols); empty blocks and partitions are allowed.
    n_cols : int, optional
        Known number of columns (else taken from the statistics pass).
    """

    def __init__(self, blocks, n_cols: Optional[int] = None):
        self.blocks = blocks
        self._n_cols = n_cols

    @property
    def num_partitions(self) -> int:
        """Partitions of the underlying RDD."""
        return self.blocks.getNumPartitions()

    def compute_column_summary_statistics(self, n_cols: Optional[int] = None) -> BlockMoments:
        """Count, column means and centred cross-product ``M2`` in one pass.

        One ``treeAggregate`` over the data: every block gives its moments with
        one float64 GEMM, blocks merge with Chan-Golub-LeVeque.

        Memory: executors ``O(b d + d^2)``; driver ``O(d^2)`` times the fan-in of
        the last tree level (:func:`tree_depth`).

        Returns
        -------
        BlockMoments
            ``n == 0`` (and ``d`` from ``n_cols``) for an empty matrix.
        """
        d = n_cols or self._n_cols or 1
        depth = tree_depth(self.num_partitions, 8 * d * d)
        result = self.blocks.treeAggregate(
            None,
            lambda acc, X: _merge_optional(acc, block_moments(X)),
            _merge_optional,
            depth,
        )
        if result is None:
            return BlockMoments.empty(d)
        self._n_cols = result.n_features
        return result

    def compute_covariance(self) -> np.ndarray:
        """Unbiased covariance (n_cols, n_cols): one pass, as
        :meth:`compute_column_summary_statistics`."""
        return covariance(self.compute_column_summary_statistics())

    def compute_principal_components_and_explained_variance(
        self, k: int, standardize: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` principal components and their explained-variance ratios.

        One pass over the data, then a float64 ``eigh`` of the d x d covariance
        (or correlation, with ``standardize=True``) on the driver.

        Memory: as :meth:`compute_column_summary_statistics`, plus ``O(d^2)`` for
        the eigendecomposition on the driver.

        Returns
        -------
        components : ndarray of shape (n_cols, k)
            Deterministic signs (largest-|x| entry positive).
        explained_variance_ratio : ndarray of shape (k,)
        """
        cov = self.compute_covariance()
        if standardize:
            cov, _ = correlation_from_covariance(cov)
        if not 1 <= k <= cov.shape[0]:
            raise ValueError(f"k={k} must be between 1 and n_features={cov.shape[0]}")
        w, V = eigh_descending(cov)
        trace = float(np.trace(cov))
        ratio = w / trace if trace > 0 else np.zeros_like(w)
        return V[:, :k], ratio[:k]

    def multiply(self, W: np.ndarray, mean: Optional[np.ndarray] = None) -> RowMatrix:
        """``(self - mean) @ W`` as a new RowMatrix; ``W`` and ``mean`` are broadcast.

        Lazy (no job). Memory: executors ``O(b d + d k)``; driver ``O(d k)``.
        """
        sc = self.blocks.context
        bw = sc.broadcast((np.asarray(W, dtype=np.float64), mean))

        def mul(X):
            W_, m_ = bw.value
            return project(X, W_, m_)

        return RowMatrix(self.blocks.map(mul), n_cols=int(W.shape[1]))


class IndexedRowMatrix:
    """Rows keyed by a stable index, in blocks that also carry a per-row payload.

    Parameters
    ----------
    blocks : pyspark.RDD of IndexedBlock
    n_cols : int, optional
    """

    def __init__(self, blocks, n_cols: Optional[int] = None):
        self.blocks = blocks
        self._n_cols = n_cols

    def to_row_matrix(self) -> RowMatrix:
        """Drop the indices (lazy)."""
        return RowMatrix(self.blocks.map(lambda b: b.X), n_cols=self._n_cols)

    def compute_column_summary_statistics(self, n_cols: Optional[int] = None) -> BlockMoments:
        """See :meth:`RowMatrix.compute_column_summary_statistics` (one pass)."""
        return self.to_row_matrix().compute_column_summary_statistics(n_cols)

    def compute_covariance(self) -> np.ndarray:
        """See :meth:`RowMatrix.compute_covariance` (one pass)."""
        return self.to_row_matrix().compute_covariance()

    def compute_principal_components_and_explained_variance(
        self, k: int, standardize: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        """See :meth:`RowMatrix.compute_principal_components_and_explained_variance`."""
        return self.to_row_matrix().compute_principal_components_and_explained_variance(
            k, standardize
        )

    def compute_pca(
        self,
        k: Optional[int] = None,
        variance: Optional[float] = None,
        n_cols: Optional[int] = None,
    ) -> PCAFit:
        """Standardise-then-PCA fit (Spark ML ``StandardScaler + PCA`` conventions).

        One pass over the data, one ``eigh`` of the correlation on the driver.
        """
        return fit_pca_from_moments(
            self.compute_column_summary_statistics(n_cols), k=k, variance=variance
        )

    def multiply(self, W: np.ndarray, mean: Optional[np.ndarray] = None) -> IndexedRowMatrix:
        """``(X - mean) @ W`` per block, keeping each row's index and payload (lazy).

        ``W`` (d x k) and ``mean`` are broadcast once. Memory: executors
        ``O(b d + d k)``; driver ``O(d k)``.
        """
        sc = self.blocks.context
        bw = sc.broadcast((np.asarray(W, dtype=np.float64), mean))

        def mul(block: IndexedBlock) -> IndexedBlock:
            W_, m_ = bw.value
            return IndexedBlock(block.index, project(block.X, W_, m_), block.keys)

        return IndexedRowMatrix(self.blocks.map(mul), n_cols=int(W.shape[1]))
