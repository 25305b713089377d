"""The open-set rule's reference rows: which rows, and in what order (pure numpy).

The rule (:mod:`linalg.openset`) is calibrated and applied against at most
:data:`CALIBRATION_ROWS` rows of the index.  Both choices below depend on the rows' content
only, never on their row ids, which follow the order Spark's partitions wrote the shards in:

- :func:`reference_rows`: the rows with the smallest **keys** (the index's key of a row is a
  hash of its photo's path, :func:`stages.storage.shards.path_keys`), found in one pass over
  the keys, a block at a time;
- :func:`canonical_order`: the order the calibration and the queries put those rows in (the
  index gives their paths: path, then label and vector) before any seeded choice (held-out
  classes, photos, samples): path order does not depend on where the bucket lies either;
- :func:`nearest`: the exact search of queries against them (ties by row: by that order).

So the same photos give the same rule, threshold and rates whatever the partitioning.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Tuple

import numpy as np

__all__ = ["CALIBRATION_ROWS", "canonical_order", "nearest", "reference_rows"]

CALIBRATION_ROWS = 20_000  # reference rows at most: bounded calibration and query work
_CHUNK = 512  # queries per GEMM of nearest


def reference_rows(
    blocks: Iterable[Tuple[int, np.ndarray]], rows_max: int = CALIBRATION_ROWS
) -> np.ndarray:
    """The ids of the reference rows: those with the ``rows_max`` smallest keys (all rows when
    there are no more), in key order, ties by row id.

    ``blocks`` gives ``(first row id, keys)`` of consecutive rows (a shard's ``keys.npy``),
    read one at a time: the memory is one block and ``rows_max`` candidates, whatever the
    number of rows.  Keys that are a hash of each row's path make the set a function of the
    rows' paths, not of their order (rows with one path share a key: which of two such rows
    at the cut is taken follows the row ids).
    """
    best_k = np.empty(0, np.uint64)
    best_i = np.empty(0, np.int64)
    for start, keys in blocks:
        keys = np.asarray(keys, dtype=np.uint64)
        ids = np.arange(start, start + len(keys), dtype=np.int64)
        if len(keys) > rows_max > 0:  # the block's own candidates first (ties kept)
            cut = np.partition(keys, rows_max - 1)[rows_max - 1]
            near = keys <= cut
            keys, ids = keys[near], ids[near]
        keys, ids = np.concatenate([best_k, keys]), np.concatenate([best_i, ids])
        order = np.lexsort((ids, keys))[:rows_max]
        best_k, best_i = keys[order], ids[order]
    return best_i


def canonical_order(
    vectors: np.ndarray, labels: Sequence[Any], keys: Optional[Sequence[Any]] = None
) -> np.ndarray:
    """The order of rows the calibration and the queries use: by ``keys`` (stable ids of the
    rows, compared as they sort: the index gives its photos' paths), then label (as text),
    then the vector's entries.

    It is a function of the rows' content: the same rows in any order come out in the same
    order (rows equal in all three are interchangeable), so every seeded choice made on it
    (held-out classes and photos, samples) is too.  Returns the permutation (n,).
    """
    X = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    text = np.asarray([str(x) for x in labels], dtype=object)
    _, code = np.unique(text, return_inverse=True)
    code = code.ravel()
    rank = None
    if keys is not None:
        _, rank = np.unique(np.asarray(keys), return_inverse=True)
        rank = rank.ravel()
        order = np.lexsort((code, rank))
        k, c = rank[order], code[order]
        if len(k) < 2 or np.all((k[1:] != k[:-1]) | (c[1:] != c[:-1])):
            return order  # no two rows share a key and a label: nothing left to break
    cols = [X[:, j] for j in range(X.shape[1] - 1, -1, -1)] + [code]
    if rank is not None:
        cols.append(rank)
    return np.lexsort(cols)


def nearest(
    Q: np.ndarray, R: np.ndarray, k: int, r_sq: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``R`` to each row of ``Q`` (exact, Euclidean).

    The candidates come from one GEMM in ``R``'s precision (float32 halves the memory
    traffic of the reference rows; float64 otherwise), 8 more than ``k``, then are measured
    in float64.  ``r_sq`` (optional) is ``R``'s squared row norms, computed once by a caller
    that asks the same ``R`` many times.  Returns ``(ids, distances)``, both
    (q, min(k, len(R))), nearest first, ties by row id.
    """
    Q = np.atleast_2d(np.asarray(Q, dtype=np.float64))
    if R.dtype != np.float32:
        R = np.asarray(R, dtype=np.float64)
    k = min(k, R.shape[0])
    ids = np.empty((Q.shape[0], k), dtype=np.int64)
    dist = np.empty((Q.shape[0], k), dtype=np.float64)
    rn = np.einsum("ij,ij->i", R, R) if r_sq is None else r_sq
    m = min(R.shape[0], k + 8)
    for s in range(0, Q.shape[0], _CHUNK):
        q = Q[s : s + _CHUNK]
        # ||r||^2 - 2 r.q ranks like ||r - q||^2; the kept candidates are then measured
        # directly in float64, so the reported distances carry no cancellation error.
        d2 = rn[None, :] - 2.0 * (q.astype(R.dtype) @ R.T)
        cand = np.argpartition(d2, m - 1, axis=1)[:, :m] if m < R.shape[0] else None
        for i in range(q.shape[0]):
            c = np.arange(R.shape[0]) if cand is None else cand[i]
            diff = R[c].astype(np.float64) - q[i]
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            order = np.lexsort((c, d))[:k]
            ids[s + i], dist[s + i] = c[order], d[order]
    return ids, dist
