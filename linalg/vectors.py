"""Nearest-neighbour search over float32 vectors: exact (BLAS) or a faiss IVF index.

Exact search is one float32 GEMV with the candidates re-ranked in float64; above
:data:`EXACT_MAX_ELEMENTS` rows x dims an inverted-file index (IVF-Flat: k-means lists,
the ``nprobe`` nearest lists scanned exactly) gives the candidates and the same float64
re-ranking orders them.  IVF, not an HNSW graph: at 1M rows x 50 it trains and fills in
6 s where the graph took 67 s (``benchmarks/search_bench.py``), it takes additions
(new rows join the nearest list), its build is deterministic (same rows, same bytes),
and the lists are scanned exactly, so near-ties do not lower its recall.  ``nprobe`` is
chosen at build, the smallest whose measured recall@10 reaches :data:`TARGET_RECALL`.
faiss is imported only where an IVF index is built or read.

The vectors are an array or any object with ``shape``, ``blocks()`` (``(first row,
block)`` pairs, e.g. memory-mapped shards) and ``take(rows)``: exact search then streams
the blocks, and the re-ranking reads only the candidates' rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

# Exact search while rows x dims stays under this (64 MB of float32: 62,500 rows at k=256):
# a warm exact query then takes <= ~8 ms on 2 cores, less than the model's ~14 ms for the
# photo, and needs no build; beyond it the IVF index wins (benchmarks/search_bench.py).
EXACT_MAX_ELEMENTS = 16_000_000


# Lists: ~2 sqrt(n) (the usual 1-16 sqrt(n) range, at its cheap end to build), at most one
# per IVF_MIN_PER_LIST rows (faiss's k-means wants 39 a centroid); k-means on a sample of
# IVF_TRAIN_PER_LIST rows a list.
IVF_MAX_LISTS = 4096
IVF_MIN_PER_LIST = 39
IVF_TRAIN_PER_LIST = 50
IVF_SEED = 1234
NPROBE_CHOICES = (4, 8, 16, 32, 64, 128, 256)
DEFAULT_NPROBE = 16  # an index whose nprobe was not measured yet
TARGET_RECALL = 0.95


RECALL_QUERIES = 500


NEIGHBOUR_SAMPLE = 2000


@dataclass
class VectorIndex:
    """Nearest neighbours (Euclidean) among the rows of ``vectors``.

    Parameters
    ----------
    vectors : ndarray (n, k), float32, or blocks of rows (see the module docstring)
    ann : faiss.IndexIVFFlat, optional
        An IVF index over the same rows; exact search when ``None``.
    nprobe : int
        Lists an approximate search scans.
    """

    vectors: Any
    ann: Any = None
    nprobe: int = DEFAULT_NPROBE

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
        """``exact`` or ``faiss-ivf``."""
        return "exact" if self.ann is None else "faiss-ivf"

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(
        self, queries: np.ndarray, top: int, exact: bool = False, nprobe: Optional[int] = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The ``top`` nearest rows of each query: ``(ids, distances)``, both (q, top),
        nearest first, distances in float64 (ties broken by row id).  ``nprobe``: this
        search's lists (default: the index's)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        top = min(top, len(self))
        if self.ann is None or exact:
            cand = self._exact_candidates(q, min(len(self), max(4 * top, top + 16)))
        else:
            import faiss

            # Per call, not on the shared index: the server searches from several threads.
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe)
            _, cand = self.ann.search(q, min(len(self), 4 * top), params=params)
            # The lists probed may hold fewer than `top` rows (a small or lopsided list):
            # those queries are answered exactly.
            short = np.flatnonzero((cand >= 0).sum(axis=1) < top)
            if len(short):
                m = min(len(self), max(4 * top, top + 16))
                full = np.full((len(q), max(m, cand.shape[1])), -1, dtype=np.int64)
                full[:, : cand.shape[1]] = cand
                full[short, :m] = self._exact_candidates(q[short], m)
                cand = full
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


def ivf_lists(n: int) -> int:
    """The number of IVF lists for ``n`` rows: ~2 sqrt(n), at most 4096 and n / 39."""
    return int(max(1, min(IVF_MAX_LISTS, round(2 * np.sqrt(n)), n // IVF_MIN_PER_LIST)))


def train_ivf(vectors, lists: Optional[int] = None, seed: int = IVF_SEED):
    """An empty faiss IVF-Flat index whose lists are k-means centroids of a seeded sample
    of ``vectors`` (an array, or blocks with ``take``: only the sample is read).  The
    rows are added with :func:`add_rows`."""
    import faiss

    n, dims = vectors.shape
    lists = ivf_lists(n) if lists is None else lists
    m = min(n, IVF_TRAIN_PER_LIST * lists)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    sample = vectors[rows] if isinstance(vectors, np.ndarray) else vectors.take(rows)
    quantizer = faiss.IndexFlatL2(dims)
    ivf = faiss.IndexIVFFlat(quantizer, dims, lists)
    ivf.cp.seed = seed
    ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
    return ivf  # faiss's wrapper keeps `quantizer` alive with it


def add_rows(ivf, vectors: np.ndarray):
    """``ivf`` with ``vectors`` added (their row ids follow its last one)."""
    ivf.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return ivf


def exact_neighbours(index: VectorIndex, rows: np.ndarray, top: int = 10) -> np.ndarray:
    """The exact ``top`` nearest other rows of each of ``rows`` (ids, (len(rows), top))."""
    ids, _ = index.search(index.rows(rows), top + 1, exact=True)
    return np.stack([e[e != r][:top] for r, e in zip(rows, ids)])


def recall_rows(n: int, queries: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    """The rows a recall is measured with: ``queries`` random rows of ``n``."""
    return np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)


def recall_of(
    index: VectorIndex, rows: np.ndarray, exact: np.ndarray, nprobe: Optional[int] = None
) -> float:
    """Recall@``exact.shape[1]`` of the approximate search of ``rows`` (each row's own id
    left out) against their ``exact`` neighbours."""
    top = exact.shape[1]
    approx, _ = index.search(index.rows(rows), top + 1, nprobe=nprobe)
    hits = 0
    for r, e, a in zip(rows, exact, approx):
        hits += len(set(e.tolist()) & set(a[a != r][:top].tolist()))
    return hits / max(1, exact.size)


def choose_nprobe(
    index: VectorIndex, rows: np.ndarray, exact: np.ndarray, target: float = TARGET_RECALL
) -> Tuple[int, float]:
    """The smallest ``nprobe`` of :data:`NPROBE_CHOICES` (at most the lists) whose recall
    reaches ``target``, and that recall; the largest when none does."""
    lists = int(index.ann.nlist)
    choices = [p for p in NPROBE_CHOICES if p < lists] + [min(lists, NPROBE_CHOICES[-1])]
    recall = 0.0
    for p in choices:
        recall = recall_of(index, rows, exact, p)
        if recall >= target:
            return p, recall
    return choices[-1], recall


def neighbour_distances(
    index: VectorIndex, sample: int = NEIGHBOUR_SAMPLE, seed: int = 0, exact: bool = True
):
    """Quantiles of the distance from a row to its nearest other row, on a sample (with
    ``exact=False``, found by the index's own search, as the app's queries are)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), size=min(sample, len(index)), replace=False)
    ids, dist = index.search(index.rows(rows), 2, exact=exact)
    # The row itself is normally first; a duplicate image at distance 0 counts as a neighbour.
    nn = np.where(ids[:, 0] == rows, dist[:, 1], dist[:, 0])
    return {
        "sample": int(len(rows)),
        "p50": float(np.quantile(nn, 0.5)),
        "p95": float(np.quantile(nn, 0.95)),
        "p99": float(np.quantile(nn, 0.99)),
        "max": float(nn.max()),
    }
