"""Similarity search over ``RESULTS/projections``: the index, queries and the label vote.

``RESULTS/index/`` (written by ``reduce`` and ``fruits-pipeline index RESULTS``):

- ``index.json``: rows, dimensions, the kind of search (``exact`` or ``faiss-hnsw``),
  the measured recall@10 of an approximate index against exact search, the bucket's own
  nearest-neighbour distances (what "no close match" is judged against), what made the
  features and the SHA-256 of the ``pca_model/arrays.npz`` it was built from;
- ``rows.parquet``: ``path, label`` in vector order;
- ``vectors.npy``: the projections, float32 (n, k);
- ``thumbs.bin`` + ``thumbs_offsets.npy``: a small JPEG per row, concatenated, so the app
  shows matches without credentials to the bucket (memory-mapped, not loaded);
- ``hnsw.faiss``: the approximate index, above :data:`EXACT_MAX_ELEMENTS` only.

Exact search is one float32 GEMV over the vectors (BLAS) with the candidates re-ranked in
float64; above :data:`EXACT_MAX_ELEMENTS` rows x dims (``benchmarks/search_bench.py``) a
faiss HNSW graph gives the candidates and the same float64 re-ranking orders them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from stages.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "EXACT_MAX_ELEMENTS",
    "MAX_UPLOAD_BYTES",
    "TOP_MAX",
    "BadImage",
    "VectorIndex",
    "SearchIndex",
    "QueryEngine",
    "build_index",
    "build_index_files",
    "decode_upload",
    "make_thumbnail",
    "vote",
]

TOP_MAX = 50  # the most matches one query returns (CLI and app)

INDEX_DIR = "index"
FORMAT = 1
# Exact search while rows x dims stays under this (64 MB of float32: 62,500 rows at k=256):
# a warm exact query then takes <= ~8 ms on 2 cores, less than the model's ~14 ms for the
# photo, and needs no build; beyond it the HNSW graph wins (benchmarks/search_bench.py).
EXACT_MAX_ELEMENTS = 16_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
RECALL_QUERIES = 1000
NEIGHBOUR_SAMPLE = 2000
# "No close match": the nearest row is farther than this multiple of the 99th percentile
# of the bucket's own nearest-neighbour distances (calibrated in tests/stages/test_search.py on
# left-out fruit photos against non-fruit images).
NO_MATCH_FACTOR = 1.5
THUMB_PX = 96
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# A phone photo is at most ~50 MP; more is a decompression bomb for a web service.
MAX_QUERY_PIXELS = 64_000_000
_MP = MAX_QUERY_PIXELS // 1_000_000


class BadImage(ValueError):
    """A query image that cannot be used; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- images


def make_thumbnail(data: Optional[bytes], px: int = THUMB_PX) -> Optional[bytes]:
    """A JPEG of at most ``px`` x ``px`` pixels, or ``None`` when ``data`` is not an image."""
    from stages.images import thumbnail_jpeg

    return thumbnail_jpeg(data, px, quality=80, max_pixels=MAX_QUERY_PIXELS)


def decode_upload(data: bytes, exif_orientation: bool = False, draft: int = 0) -> np.ndarray:
    """Decode a query photo exactly as ``featurize`` decodes the bucket's images
    (``exif_orientation`` as recorded in the features' model).

    Raises
    ------
    BadImage
        Empty, over :data:`MAX_UPLOAD_BYTES`, not an image, truncated, or more pixels
        than :data:`MAX_QUERY_PIXELS` (checked from the header, before decoding).
    """
    from PIL import Image

    from stages.images import DecodeError, decode_image

    if not data:
        raise BadImage("the image is empty (0 bytes)", 400)
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadImage(f"the image is {len(data)} bytes, over the limit of 10 MB", 413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (expected a JPEG, PNG or another photo format)", 415) from None
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise BadImage(
            f"the image has hundreds of megapixels, over the limit of {_MP} MP "
            "(a decompression bomb?)",
            413,
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot read the image: {exc}", 422) from None
    if w * h > MAX_QUERY_PIXELS:
        raise BadImage(
            f"the image is {w}x{h} pixels, over the limit of {_MP} MP (a decompression bomb?)",
            413,
        )
    try:
        return decode_image(data, exif_orientation=exif_orientation, draft=draft)
    except DecodeError as exc:
        raise BadImage(f"cannot decode the image: {exc}", 422) from None


# ---------------------------------------------------------------------------- vectors


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


# ---------------------------------------------------------------------------- building


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_index_files(
    paths: Sequence[str],
    labels: Sequence[str],
    vectors: np.ndarray,
    thumbs: Sequence[Optional[bytes]],
    pca_arrays_sha256: str,
    features_model: Dict[str, Any],
    exact_max_elements: int = EXACT_MAX_ELEMENTS,
) -> Dict[str, bytes]:
    """The files of ``RESULTS/index/``, by name (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    n = len(paths)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape[0] != n or n == 0:
        raise UsageError(f"cannot index {vectors.shape[0]} vectors for {n} rows")
    files: Dict[str, bytes] = {}
    hnsw = build_hnsw(vectors) if vectors.size > exact_max_elements else None
    index = VectorIndex(vectors, hnsw)
    meta: Dict[str, Any] = {
        "format": FORMAT,
        "rows": n,
        "dims": int(vectors.shape[1]),
        "kind": index.kind,
        "exact_max_elements": exact_max_elements,
        "pca_arrays_sha256": pca_arrays_sha256,
        "features_model": features_model,
        "thumbnails": {"px": THUMB_PX, "missing": sum(t is None for t in thumbs)},
    }
    if hnsw is not None:
        import faiss

        files["hnsw.faiss"] = faiss.serialize_index(hnsw).tobytes()
        meta["hnsw"] = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
        meta["hnsw"]["ef_search"] = HNSW_EF_SEARCH
        meta["recall_at_10"] = recall_at(index, 10)
        meta["recall_queries"] = min(RECALL_QUERIES, n)
    else:
        meta["recall_at_10"] = 1.0  # exact search, by construction
    meta["neighbour_distance"] = neighbour_distances(index)
    meta["no_match_distance"] = NO_MATCH_FACTOR * meta["neighbour_distance"]["p99"]

    buf = io.BytesIO()
    np.save(buf, vectors)
    files["vectors.npy"] = buf.getvalue()
    table = pa.table({"path": pa.array(list(paths), pa.string()), "label": list(labels)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    files["rows.parquet"] = buf.getvalue()
    sizes = np.array([0 if t is None else len(t) for t in thumbs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    files["thumbs.bin"] = b"".join(t for t in thumbs if t)
    buf = io.BytesIO()
    np.save(buf, offsets)
    files["thumbs_offsets.npy"] = buf.getvalue()
    meta["build_s"] = time.perf_counter() - t0
    files["index.json"] = json.dumps(meta, indent=2).encode()
    return files


def _thumbnail_column(spark, proj):
    """``proj`` (path, label, pca) with a ``thumb`` column, read by Spark from the images."""
    from pyspark.sql import functions as F

    from stages import hadoopfs

    parents = sorted({posixpath.dirname(r.path) for r in proj.select("path").collect()})
    readable = [p for p in parents if hadoopfs.exists(spark, p)]
    if len(readable) < len(parents):
        logger.warning(
            f"index: {len(parents) - len(readable)} image folder(s) gone: no thumbnails there"
        )
    if not readable:
        return proj.withColumn("thumb", F.lit(None).cast("binary"))

    @F.pandas_udf("binary")
    def thumb(content):
        return content.map(make_thumbnail)

    images = (
        spark.read.format("binaryFile")
        .load(readable)
        .select("path", thumb("content").alias("thumb"))
    )
    return proj.join(images, "path", "left")


def build_index(spark, results: str) -> Dict[str, Any]:
    """Build ``RESULTS/index/`` from ``RESULTS/projections`` and ``RESULTS/pca_model``.

    Written beside, then swapped in (:func:`stages.outputs.atomic_output`): a failed
    build leaves the previous index in place.  Returns the index's ``index.json`` content.
    """
    from stages import hadoopfs
    from stages.outputs import atomic_output

    base = results.rstrip("/")
    if not hadoopfs.exists(spark, f"{base}/projections") or not hadoopfs.exists(
        spark, f"{base}/pca_model/model.json"
    ):
        raise UsageError(
            f"{results} has no projections/ and pca_model/: give a RESULTS folder of `reduce`"
        )
    t0 = time.perf_counter()
    arrays = hadoopfs.read_bytes(spark, f"{base}/pca_model/arrays.npz")
    model = json.loads(hadoopfs.read_bytes(spark, f"{base}/pca_model/model.json").decode("utf-8"))
    proj = spark.read.parquet(f"{base}/projections")
    pdf = _thumbnail_column(spark, proj).orderBy("path").toPandas()
    if len(pdf) == 0:
        raise UsageError(f"{results}/projections has no rows: nothing to index")
    vectors = np.stack(pdf["pca"].to_numpy()).astype(np.float32)
    thumbs = [None if t is None else bytes(t) for t in pdf["thumb"]]
    missing = sum(t is None for t in thumbs)
    if missing:
        logger.warning(
            f"index: {missing} of {len(thumbs)} images have no thumbnail (unreadable or gone)"
        )
    files = build_index_files(
        pdf["path"].tolist(),
        pdf["label"].tolist(),
        vectors,
        thumbs,
        _sha256(arrays),
        model.get("features_model") or {},
    )
    # Written beside and swapped in; index.json last, so a partial index is no index.
    with atomic_output(spark, f"{base}/{INDEX_DIR}", overwrite=True) as target:
        for name in sorted(files, key=lambda n: n == "index.json"):
            hadoopfs.write_bytes(spark, f"{target}/{name}", files[name])
    meta = json.loads(files["index.json"])
    logger.info(
        f"index: {meta['rows']} rows, {meta['kind']} search, recall@10 {meta['recall_at_10']:.3f}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return meta


# ---------------------------------------------------------------------------- querying


def _local(results: str) -> str:
    if results.startswith("file:"):
        results = "/" + results[len("file:") :].lstrip("/")
    if "://" in results:
        raise UsageError(
            f"{results} is not a local folder: copy the index first, e.g. "
            f"`aws s3 sync {results.rstrip('/')}/ ./Results/ --exclude 'projections/*'`"
        )
    return results


class SearchIndex:
    """``RESULTS/index/`` loaded for queries (vectors in memory, thumbnails mapped)."""

    def __init__(self, results: str) -> None:
        import pyarrow.parquet as pq

        base = os.path.join(_local(results), INDEX_DIR)
        if not os.path.isfile(os.path.join(base, "index.json")):
            raise UsageError(
                f"{results} has no search index: run `fruits-pipeline index {results}`"
            )
        with open(os.path.join(base, "index.json"), encoding="utf-8") as fh:
            self.meta: Dict[str, Any] = json.load(fh)
        if self.meta.get("format") != FORMAT:
            raise UsageError(f"{base} is an index of another format: run `fruits-pipeline index`")
        rows = pq.read_table(os.path.join(base, "rows.parquet"))
        self.paths: List[str] = rows.column("path").to_pylist()
        self.labels: List[str] = rows.column("label").to_pylist()
        hnsw = None
        if self.meta["kind"] == "faiss-hnsw":
            import faiss

            hnsw = faiss.read_index(os.path.join(base, "hnsw.faiss"))
        self.vectors = VectorIndex(np.load(os.path.join(base, "vectors.npy")), hnsw)
        self._offsets = np.load(os.path.join(base, "thumbs_offsets.npy"))
        size = os.path.getsize(os.path.join(base, "thumbs.bin"))
        self._thumbs = (
            np.memmap(os.path.join(base, "thumbs.bin"), dtype=np.uint8, mode="r")
            if size
            else np.zeros(0, np.uint8)
        )
        if not len(self.paths) == len(self.vectors) == len(self._offsets) - 1:
            raise UsageError(f"{base} is inconsistent: run `fruits-pipeline index {results}`")

    def thumbnail(self, row: int) -> Optional[bytes]:
        """The JPEG thumbnail of a row, or ``None``."""
        a, b = int(self._offsets[row]), int(self._offsets[row + 1])
        return bytes(self._thumbs[a:b]) if b > a else None


def vote(labels: Sequence[str], distances: Sequence[float]) -> Dict[str, Any]:
    """The most frequent label of the matches (a tie goes to the label of the nearer match)."""
    counts = Counter(labels)
    best = max(counts.values())
    first = {}
    for lab, d in zip(labels, distances):
        first.setdefault(lab, d)
    label = min((lab for lab, c in counts.items() if c == best), key=lambda lab: first[lab])
    return {"label": label, "count": best, "of": len(labels)}


def _data_uri(jpeg: Optional[bytes]) -> Optional[str]:
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class QueryEngine:
    """Photo in, matches out: the model that made the features, the PCA, the index.

    Parameters
    ----------
    results : str
        A local RESULTS folder with ``pca_model/`` and ``index/``.

    Raises
    ------
    UsageError
        Missing or stale index, or weights that are not the ones that made the features.
    """

    def __init__(self, results: str) -> None:
        from stages.pca_model import ARRAYS, META, MODEL_DIR, PCAModel

        folder = os.path.join(_local(results), MODEL_DIR)
        if not os.path.isfile(os.path.join(folder, ARRAYS)):
            raise UsageError(f"{results} has no pca_model/: give a RESULTS folder of `reduce`")
        self.index = SearchIndex(results)
        with open(os.path.join(folder, ARRAYS), "rb") as fh:
            arrays = fh.read()  # read once: hashed here, loaded below
        if _sha256(arrays) != self.index.meta["pca_arrays_sha256"]:
            raise UsageError(
                f"{results}/index was built from another PCA: run `fruits-pipeline index {results}`"
            )
        with open(os.path.join(folder, META), "rb") as fh:
            self.pca = PCAModel.from_files(arrays, fh.read())
        if self.pca.n_components != self.index.meta["dims"]:
            raise UsageError(f"{results}/index does not match its PCA: run `fruits-pipeline index`")
        try:
            self._featurize = self.pca.featurizer()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        spec = self.pca.features_model
        self._exif_orientation = bool(spec.get("exif_orientation", False))
        self._jpeg_draft = int(spec.get("jpeg_draft", 0))
        self.model_info = {
            "name": spec.get("name"),
            "alpha": spec.get("alpha"),
            "weights_source": spec.get("weights_source"),
            "weights_sha256": spec.get("weights_sha256"),
            "k": self.pca.n_components,
            "rows": len(self.index.vectors),
            "index": self.index.vectors.kind,
            "recall_at_10": self.index.meta.get("recall_at_10"),
            "no_match_distance": self.index.meta["no_match_distance"],
        }

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Decoded images (n, 224, 224, 3) uint8 to PCA coordinates (n, k)."""
        from stages.images import preprocess

        return self.pca.transform(self._featurize(preprocess(images)))

    def answer(self, point: np.ndarray, top: int = 10) -> Dict[str, Any]:
        """The answer object for one projected photo (see the README)."""
        ids, dist = self.index.vectors.search(point[None, :], top)
        ids, dist = ids[0], dist[0]
        labels = [self.index.labels[i] for i in ids]
        matches = [
            {
                "path": self.index.paths[i],
                "label": lab,
                "distance": round(float(d), 4),
                "thumbnail": _data_uri(self.index.thumbnail(int(i))),
            }
            for i, lab, d in zip(ids, labels, dist)
        ]
        v = vote(labels, dist)
        limit = float(self.index.meta["no_match_distance"])
        close = bool(len(dist) and dist[0] <= limit)
        if close:
            verdict = f"{v['label']} — {v['count']} of the {v['of']} nearest"
        else:
            verdict = (
                f"no close match: the nearest image is at {dist[0]:.1f}, beyond {limit:.1f} "
                "(1.5 x the distance within which 99% of the bucket's images have a neighbour)"
            )
        return {
            "vote": v,
            "close_match": close,
            "verdict": verdict,
            "matches": matches,
            "model": self.model_info,
        }

    def decode(self, data: bytes) -> np.ndarray:
        """:func:`decode_upload` with the EXIF handling that made the features."""
        return decode_upload(data, exif_orientation=self._exif_orientation, draft=self._jpeg_draft)

    def similar_bytes(self, data: bytes, top: int = 10) -> Dict[str, Any]:
        """Decode, featurize, project and search one photo (raises :class:`BadImage`)."""
        return self.answer(self.embed(self.decode(data)[None])[0], top)
