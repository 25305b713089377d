"""Nearest-neighbour search over float32 vectors: exact (BLAS) or a faiss HNSW graph.

Exact search is one float32 GEMV with the candidates re-ranked in float64; above
:data:`EXACT_MAX_ELEMENTS` rows x dims an HNSW graph gives the candidates and the same
float64 re-ranking orders them.  faiss is imported only where a graph is built or read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

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
    vectors : ndarray (n, k), float32
    hnsw : faiss.Index, optional
        An HNSW graph over the same rows; exact search when ``None``.
    """

    vectors: np.ndarray
    hnsw: Any = None

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        v64 = self.vectors.astype(np.float64)
        self._norms = np.einsum("ij,ij->i", v64, v64).astype(np.float32)

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
        # ||x||^2 - 2 x.q ranks like ||x - q||^2: one GEMM, no (n, k) temporary.
        out = np.empty((q.shape[0], m), dtype=np.int64)
        step = max(1, min(256, 2**26 // len(self)))  # (step, n) float32 temporaries <= 256 MB
        for s in range(0, q.shape[0], step):
            d2 = self._norms[None, :] - 2.0 * (q[s : s + step] @ self.vectors.T)
            if m < d2.shape[1]:
                part = np.argpartition(d2, m - 1, axis=1)[:, :m]
            else:
                part = np.broadcast_to(np.arange(d2.shape[1]), d2.shape)
            out[s : s + step] = part
        return out

    def _rerank(self, q: np.ndarray, cand: np.ndarray, top: int) -> Tuple[np.ndarray, np.ndarray]:
        ids = np.empty((q.shape[0], top), dtype=np.int64)
        dist = np.empty((q.shape[0], top), dtype=np.float64)
        for i in range(q.shape[0]):
            c = cand[i][cand[i] >= 0]
            diff = self.vectors[c].astype(np.float64) - q[i].astype(np.float64)
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            order = np.lexsort((c, d))[:top]
            ids[i], dist[i] = c[order], d[order]
        return ids, dist


def build_hnsw(vectors: np.ndarray):
    """A faiss HNSW graph (M=32) over ``vectors`` (float32)."""
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def recall_at(index: VectorIndex, top: int = 10, queries: int = RECALL_QUERIES, seed: int = 0):
    """Recall@``top`` of the approximate search against exact search, queried with
    ``queries`` random rows of the index (each row's own id left out of both answers)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), size=min(queries, len(index)), replace=False)
    q = index.vectors[rows]
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
    ids, dist = index.search(index.vectors[rows], 2, exact=True)
    # The row itself is normally first; a duplicate image at distance 0 counts as a neighbour.
    nn = np.where(ids[:, 0] == rows, dist[:, 1], dist[:, 0])
    return {
        "sample": int(len(rows)),
        "p50": float(np.quantile(nn, 0.5)),
        "p95": float(np.quantile(nn, 0.95)),
        "p99": float(np.quantile(nn, 0.99)),
        "max": float(nn.max()),
    }
