"""Nearest-neighbour search over vectors that live in blocks (memory-mapped shards)."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from stages.search import VectorIndex

__all__ = ["BlockVectorIndex"]


class BlockVectorIndex(VectorIndex):
    """:class:`VectorIndex` over an object with ``blocks()``, ``take(rows)``, ``len``
    (a :class:`stages.index_shards.ShardSet`) or an array.

    Exact search streams the blocks (each block's candidates kept, then merged); the
    float64 re-ranking reads only the candidates' rows.
    """

    def __post_init__(self) -> None:
        if isinstance(self.vectors, np.ndarray):
            self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self._block_norms: Dict[int, np.ndarray] = {}

    def _blocks(self):
        if isinstance(self.vectors, np.ndarray):
            return [(0, self.vectors)]
        return list(self.vectors.blocks())

    def _take(self, rows: np.ndarray) -> np.ndarray:
        if isinstance(self.vectors, np.ndarray):
            return self.vectors[rows]
        return self.vectors.take(rows)

    def _norms_of(self, i: int, block: np.ndarray) -> np.ndarray:
        if i not in self._block_norms:  # once per block: ||x||^2 in float64
            b = np.asarray(block, dtype=np.float64)
            self._block_norms[i] = np.einsum("ij,ij->i", b, b).astype(np.float32)
        return self._block_norms[i]

    def _exact_candidates(self, q: np.ndarray, m: int) -> np.ndarray:
        blocks = self._blocks()
        ids, d2s = [], []
        for i, (start, block) in enumerate(blocks):
            norms = self._norms_of(i, block)
            rows = len(block)
            mm = min(m, rows)
            step = max(1, min(256, 2**26 // rows))
            bid = np.empty((q.shape[0], mm), np.int64)
            bd2 = np.empty((q.shape[0], mm), np.float32)
            for s in range(0, q.shape[0], step):
                d2 = norms[None, :] - 2.0 * (q[s : s + step] @ np.asarray(block).T)
                part = (
                    np.argpartition(d2, mm - 1, axis=1)[:, :mm]
                    if mm < rows
                    else np.broadcast_to(np.arange(rows), d2.shape)
                )
                bid[s : s + step] = part + start
                bd2[s : s + step] = np.take_along_axis(d2, part, axis=1)
            ids.append(bid)
            d2s.append(bd2)
        ids_all, d2_all = np.concatenate(ids, axis=1), np.concatenate(d2s, axis=1)
        if ids_all.shape[1] <= m:
            return ids_all
        keep = np.argpartition(d2_all, m - 1, axis=1)[:, :m]
        return np.take_along_axis(ids_all, keep, axis=1)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, top: int) -> Tuple[np.ndarray, np.ndarray]:
        ids = np.empty((q.shape[0], top), dtype=np.int64)
        dist = np.empty((q.shape[0], top), dtype=np.float64)
        for i in range(q.shape[0]):
            c = cand[i][cand[i] >= 0]
            diff = self._take(c).astype(np.float64) - q[i].astype(np.float64)
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            order = np.lexsort((c, d))[:top]
            ids[i], dist[i] = c[order], d[order]
        return ids, dist
