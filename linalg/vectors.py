"""Nearest-neighbour search over float32 vectors: exact (BLAS) or a faiss HNSW graph.

Exact search is one float32 GEMV with the candidates re-ranked in float64; above
:data:`EXACT_MAX_ELEMENTS` rows x dims an HNSW graph gives the candidates and the same
float64 re-ranking orders them.  faiss is imported only where a graph is built or read.

The vectors are an array or any object with ``shape``, ``blocks()`` (``(first row,
block)`` pairs, e.g. memory-mapped shards) and ``take(rows)``: exact search then streams
the blocks, and the re-ranking reads only the candidates' rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Tuple

import numpy as np

# Exact search while rows x dims stays under this (64 MB of float32: 62,500 rows at k=256):
# a warm exact query then takes <= ~8 ms on 2 cores, less than the model's ~14 ms for the
# photo, and needs no build; beyond it the HNSW graph wins (benchmarks/search_bench.py).
EXACT_MAX_ELEMENTS = 16_000_000


HNSW_M = 32


HNSW_EF_CONSTRUCTION = 80


HNSW_EF_SEARCH = 128


RECALL_QUERIES = 1000


NEIGHBOUR_SAMPLE = 2000


@dataclass
class VectorIndex:
    """Nearest neighbours (Euclidean) among the rows of ``vectors``.

    Parameters
    ----------
    vectors : ndarray (n, k), float32, or blocks of rows (see the module docstring)
    hnsw : faiss.Index, optional
        An HNSW graph over the same rows; exact search when ``None``.
    """

    vectors: Any
    hnsw: Any = None

    def __post_init__(self) -> None:
        if not hasattr(self.vectors, "blocks"):
            self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self._norms: Dict[int, np.ndarray] = {}  # per block, computed by the first exact search

    def _blocks(self) -> Iterable[Tuple[int, np.ndarray]]:
        if isinstance(self.vectors, np.ndarray):
            return [(0, self.vectors)]
        return self.vectors.blocks()

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of rows ``ids`` (float32)."""
        if isinstance(self.vectors, np.ndarray):
            return self.vectors[ids]
        return self.vectors.take(ids)

    def _block_norms(self, start: int, block: np.ndarray) -> np.ndarray:
        if start not in self._norms:  # ||x||^2 accumulated in float64
            b = np.asarray(block, dtype=np.float64)
            self._norms[start] = np.einsum("ij,ij->i", b, b).astype(np.float32)
        return self._norms[start]

    @property
    def kind(self) -> str:
        """``exact`` or ``faiss-hnsw``."""
        return "exact" if self.hnsw is None else "faiss-hnsw"

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(
        self, queries: np.ndarray, top: int, exact: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The ``top`` nearest rows of each query: ``(ids, distances)``, both (q, top),
        nearest first, distances in float64 (ties broken by row id)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        top = min(top, len(self))
        if self.hnsw is None or exact:
            cand = self._exact_candidates(q, min(len(self), max(4 * top, top + 16)))
        else:
            import faiss

            # Per call, not on the shared index: the server searches from several threads.
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, 4 * top))
            _, cand = self.hnsw.search(q, min(len(self), 4 * top), params=params)
        return self._rerank(q, cand, top)

    def _exact_candidates(self, q: np.ndarray, m: int) -> np.ndarray:
        # ||x||^2 - 2 x.q ranks like ||x - q||^2: one GEMM a block, no (n, k) temporary;
        # each block's m best are kept, then the best m of those.
        ids, d2s = [], []
        for start, block in self._blocks():
            rows = len(block)
            mb = min(m, rows)
            norms = self._block_norms(start, block)
            bid = np.empty((q.shape[0], mb), np.int64)
            bd2 = np.empty((q.shape[0], mb), np.float32)
            # (step, rows) temporaries: <= 64 MB of float32 and 128 MB of argpartition ids
            step = max(1, min(256, 2**24 // rows))
            for s in range(0, q.shape[0], step):
                d2 = norms[None, :] - 2.0 * (q[s : s + step] @ np.asarray(block).T)
                if mb < rows:
                    part = np.argpartition(d2, mb - 1, axis=1)[:, :mb]
                else:
                    part = np.broadcast_to(np.arange(rows), d2.shape)
                bid[s : s + step] = part + start
                bd2[s : s + step] = np.take_along_axis(d2, part, axis=1)
            ids.append(bid)
            d2s.append(bd2)
        cand, d2 = np.concatenate(ids, axis=1), np.concatenate(d2s, axis=1)
        if cand.shape[1] <= m:
            return cand
        keep = np.argpartition(d2, m - 1, axis=1)[:, :m]
        return np.take_along_axis(cand, keep, axis=1)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, top: int) -> Tuple[np.ndarray, np.ndarray]:
        ids = np.empty((q.shape[0], top), dtype=np.int64)
        dist = np.empty((q.shape[0], top), dtype=np.float64)
        for i in range(q.shape[0]):
            c = cand[i][cand[i] >= 0]
            diff = self.rows(c).astype(np.float64) - q[i].astype(np.float64)
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            order = np.lexsort((c, d))[:top]
            ids[i], dist[i] = c[order], d[order]
        return ids, dist


def build_hnsw(vectors: np.ndarray, graph=None):
    """A faiss HNSW graph (M=32) over ``vectors`` (float32), or ``graph`` with them added
    (their row ids follow its last one)."""
    import faiss

    if graph is None:
        graph = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    graph.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return graph


def recall_at(index: VectorIndex, top: int = 10, queries: int = RECALL_QUERIES, seed: int = 0):
    """Recall@``top`` of the approximate search against exact search, queried with
    ``queries`` random rows of the index (each row's own id left out of both answers)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), size=min(queries, len(index)), replace=False)
    q = index.rows(rows)
    exact, _ = index.search(q, top + 1, exact=True)
    approx, _ = index.search(q, top + 1)
    hits = 0
    for r, e, a in zip(rows, exact, approx):
        e_set = set(e[e != r][:top].tolist())
        hits += len(e_set & set(a[a != r][:top].tolist()))
    return hits / (len(rows) * top)


def neighbour_distances(index: VectorIndex, sample: int = NEIGHBOUR_SAMPLE, seed: int = 0):
    """Quantiles of the distance from a row to its nearest other row (exact, on a sample)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), size=min(sample, len(index)), replace=False)
    ids, dist = index.search(index.rows(rows), 2, exact=True)
    # The row itself is normally first; a duplicate image at distance 0 counts as a neighbour.
    nn = np.where(ids[:, 0] == rows, dist[:, 1], dist[:, 0])
    return {
        "sample": int(len(rows)),
        "p50": float(np.quantile(nn, 0.5)),
        "p95": float(np.quantile(nn, 0.95)),
        "p99": float(np.quantile(nn, 0.99)),
        "max": float(nn.max()),
    }
