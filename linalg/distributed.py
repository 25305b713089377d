"""Distributed matrices over Spark RDDs of numpy row blocks.

``RowMatrix`` is an RDD of 2-d float blocks (one or more per partition) and
``KeyedRowMatrix`` an RDD of :class:`KeyedBlock`, whose rows carry an opaque
per-row payload (the reduce stage keeps each row's ``path`` and ``label`` there),
so a projection keeps track of its rows without a join.  The pure kernels of
:mod:`linalg.kernels` do the arithmetic; this module only moves blocks around.

Methods named ``compute_*`` launch a Spark job; each docstring states its passes
over the data and its memory on the executors and on the driver (``d`` is the
number of columns, ``b`` the rows of the largest block, ``P`` the partitions).
``project`` is lazy: the matrix it returns owns the broadcast of ``W``, which
:meth:`RowMatrix.release` (or leaving its ``with`` block) destroys once the jobs
that read it are done.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from linalg.kernels import (
    BlockMoments,
    block_moments,
    merge_moments,
    project,
)

__all__ = [
    "KeyedBlock",
    "KeyedRowMatrix",
    "RowMatrix",
    "aggregate_budget",
    "parse_byte_size",
    "tree_depth",
]

# Spark's default spark.driver.maxResultSize, used when it is 0 (unlimited) or unset.
DEFAULT_MAX_RESULT_SIZE = 1024**3
_BYTE_SUFFIXES = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_BYTE_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?b?)\s*$", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """Bytes in a Spark size string (``"1g"``, ``"512m"``, ``"2048"``: bytes).

    Suffixes are binary (``k`` = 1024), with or without a trailing ``b``, as in
    Spark's ``spark.driver.maxResultSize``.
    """
    m = _BYTE_SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size such as 1g, 512m or 1048576")
    suffix = m.group(2).lower()
    unit = suffix[:-1] if len(suffix) == 2 else suffix  # "mb" -> "m"; "b" stays
    return int(m.group(1)) * _BYTE_SUFFIXES[unit]


def aggregate_budget(sc) -> int:
    """What one ``treeAggregate`` level may gather at once: half of the driver's
    ``spark.driver.maxResultSize`` (1g when unset or 0, i.e. unlimited).

    Half, because PySpark's ``treeAggregate`` may leave a couple more partitions
    than the fan-in for its last level, and pickled arrays carry headers.
    """
    limit = parse_byte_size(sc.getConf().get("spark.driver.maxResultSize", "1g"))
    return (limit or DEFAULT_MAX_RESULT_SIZE) // 2


def tree_depth(
    n_partitions: int, aggregate_bytes: int, budget: int = DEFAULT_MAX_RESULT_SIZE // 2
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
class KeyedBlock:
    """A block of rows with a per-row payload.

    Attributes
    ----------
    X : ndarray of shape (n_rows, n_cols)
    keys : object, optional
        Carried along untouched, row for row (e.g. a pyarrow table of ``path`` and
        ``label``).
    """

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
        Known number of columns (else taken from the moments pass).
    """

    def __init__(self, blocks, n_cols: Optional[int] = None):
        self.blocks = blocks
        self._n_cols = n_cols
        self._broadcasts: List[Any] = []

    @property
    def num_partitions(self) -> int:
        """Partitions of the underlying RDD."""
        return self.blocks.getNumPartitions()

    def compute_moments(self, n_cols: Optional[int] = None) -> BlockMoments:
        """Count, column means and centred cross-product ``M2`` in one pass.

        One ``treeAggregate`` over the data: every block gives its moments with
        one float64 syrk, blocks merge with Chan-Golub-LeVeque.  The tree is as
        deep as :func:`tree_depth` needs to keep each level under
        :func:`aggregate_budget`.

        Memory: executors ``O(b d + d^2)``; driver ``O(d^2)`` times the fan-in of
        the last tree level.

        Returns
        -------
        BlockMoments
            ``n == 0`` (and ``d`` from ``n_cols``) for an empty matrix.
        """
        d = n_cols or self._n_cols or 1
        budget = aggregate_budget(self.blocks.context)
        depth = tree_depth(self.num_partitions, 8 * (d * d + d), budget)
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

    def _with_broadcast(self, W: np.ndarray, mean: Optional[np.ndarray]):
        W = np.asarray(W, dtype=np.float64)
        if mean is not None:
            mean = np.asarray(mean, dtype=np.float64)
        return W, self.blocks.context.broadcast((W, mean))

    def project(self, W: np.ndarray, mean: Optional[np.ndarray] = None) -> RowMatrix:
        """``(self - mean) @ W`` as a new RowMatrix (:func:`linalg.kernels.project`).

        Lazy (no job). ``W`` (d x k) and ``mean`` are broadcast once; the new
        matrix owns the broadcast (:meth:`release`). Memory: executors
        ``O(b d + d k)``; driver ``O(d k)``.
        """
        W, bw = self._with_broadcast(W, mean)

        def mul(X):
            W_, m_ = bw.value
            return project(X, W_, m_)

        out = RowMatrix(self.blocks.map(mul), n_cols=int(W.shape[1]))
        out._broadcasts.append(bw)
        return out

    def release(self) -> None:
        """Destroy the broadcasts this matrix owns (its blocks cannot be computed after)."""
        while self._broadcasts:
            self._broadcasts.pop().destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class KeyedRowMatrix(RowMatrix):
    """A RowMatrix whose blocks are :class:`KeyedBlock`: each row keeps its payload.

    Parameters
    ----------
    blocks : pyspark.RDD of KeyedBlock
    n_cols : int, optional
    """

    def to_row_matrix(self) -> RowMatrix:
        """Drop the payload (lazy)."""
        return RowMatrix(self.blocks.map(lambda b: b.X), n_cols=self._n_cols)

    def compute_moments(self, n_cols: Optional[int] = None) -> BlockMoments:
        """See :meth:`RowMatrix.compute_moments` (one pass)."""
        moments = self.to_row_matrix().compute_moments(n_cols)
        if moments.n:
            self._n_cols = moments.n_features
        return moments

    def project(self, W: np.ndarray, mean: Optional[np.ndarray] = None) -> KeyedRowMatrix:
        """``(X - mean) @ W`` per block, keeping each row's payload (lazy).

        ``W`` (d x k) and ``mean`` are broadcast once; the new matrix owns the
        broadcast (:meth:`release`). Memory: executors ``O(b d + d k)``; driver
        ``O(d k)``.
        """
        W, bw = self._with_broadcast(W, mean)

        def mul(block: KeyedBlock) -> KeyedBlock:
            W_, m_ = bw.value
            return KeyedBlock(project(block.X, W_, m_), block.keys)

        out = KeyedRowMatrix(self.blocks.map(mul), n_cols=int(W.shape[1]))
        out._broadcasts.append(bw)
        return out
