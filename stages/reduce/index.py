"""The search index of RESULTS, built from ``RESULTS/projections`` on the driver.

``RESULTS/index/`` (written by ``reduce`` and ``fruits-pipeline index RESULTS``):

- ``index.json``: rows, dimensions, the kind of search (``exact`` or ``faiss-hnsw``),
  the measured recall@10 of an approximate index against exact search, the bucket's own
  nearest-neighbour distances, the open-set rule (``open_set``: what "no close match"
  means, calibrated on the bucket by :func:`open_set_rule`, with its measured rates), what
  made the features and the SHA-256 of the ``pca_model/arrays.npz`` it was built from;
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

import hashlib
import io
import json
import logging
import posixpath
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from linalg.openset import CALIBRATION_ROWS, calibrate, reference_rows
from linalg.vectors import (
    EXACT_MAX_ELEMENTS,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    RECALL_QUERIES,
    VectorIndex,
    build_hnsw,
    neighbour_distances,
    recall_at,
)
from stages.base.errors import UsageError
from stages.storage import hadoopfs
from stages.storage.layout import INDEX_META, Results
from stages.storage.outputs import atomic_output

logger = logging.getLogger(__name__)

# A phone photo is at most ~50 MP; more is a decompression bomb for a web service.
MAX_QUERY_PIXELS = 64_000_000


FORMAT = 2  # 2: index.json has the calibrated open-set rule ("open_set")


OPEN_SET_SEED = 0


THUMB_PX = 96


def make_thumbnail(data: Optional[bytes], px: int = THUMB_PX) -> Optional[bytes]:
    """A JPEG of at most ``px`` x ``px`` pixels, or ``None`` when ``data`` is not an image."""
    from stages.featurize.images import thumbnail_jpeg

    return thumbnail_jpeg(data, px, quality=80, max_pixels=MAX_QUERY_PIXELS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_set_rule(vectors: np.ndarray, labels: Sequence[str]) -> Dict[str, Any]:
    """The ``open_set`` entry of ``index.json``: :func:`linalg.openset.calibrate` on the
    index's reference rows (all of them up to :data:`~linalg.openset.CALIBRATION_ROWS`, a
    seeded sample above: the driver's work stays bounded), and which rows those are."""
    n = len(labels)
    ref = reference_rows(n, CALIBRATION_ROWS, OPEN_SET_SEED)
    t0 = time.perf_counter()
    rule = calibrate(vectors[ref], [labels[i] for i in ref], seed=OPEN_SET_SEED)
    rule["reference"] = {"rows": int(len(ref)), "of": n, "seed": OPEN_SET_SEED}
    rule["calibration_s"] = round(time.perf_counter() - t0, 3)
    return rule


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
    meta["open_set"] = open_set_rule(vectors, labels)

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
    files[INDEX_META] = json.dumps(meta, indent=2).encode()
    return files


def _thumbnail_column(spark, proj):
    """``proj`` (path, label, pca) with a ``thumb`` column, read by Spark from the images."""
    from pyspark.sql import functions as F

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

    Written beside, then swapped in (:func:`stages.storage.outputs.atomic_output`): a failed
    build leaves the previous index in place.  Returns the index's ``index.json`` content.
    """

    layout = Results(results)
    if not hadoopfs.exists(spark, layout.projections) or not hadoopfs.exists(
        spark, layout.model_meta
    ):
        raise UsageError(
            f"{results} has no projections/ and pca_model/: give a RESULTS folder of `reduce`"
        )
    t0 = time.perf_counter()
    arrays = hadoopfs.read_bytes(spark, layout.arrays)
    model = json.loads(hadoopfs.read_bytes(spark, layout.model_meta).decode("utf-8"))
    proj = spark.read.parquet(layout.projections)
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
        sha256_hex(arrays),
        model.get("features_model") or {},
    )
    # Written beside and swapped in; index.json last, so a partial index is no index.
    with atomic_output(spark, layout.index, overwrite=True) as target:
        for name in sorted(files, key=lambda n: n == INDEX_META):
            hadoopfs.write_bytes(spark, f"{target}/{name}", files[name])
    meta = json.loads(files[INDEX_META])
    logger.info(
        f"index: {meta['rows']} rows, {meta['kind']} search, recall@10 {meta['recall_at_10']:.3f}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    logger.info(f"index: {open_set_summary(meta['open_set'])}")
    return meta


def open_set_summary(rule: Dict[str, Any]) -> str:
    """One line on the open-set rule of an index: what it is and what was measured."""
    if not rule.get("calibrated"):
        return f"open set not calibrated ({rule['reason']}): fallback, {rule['fallback']}"
    return (
        f"open set: {rule['rule']} <= {rule['threshold']:.3f}, calibrated by leaving "
        f"{rule['held_out_classes_per_repeat']} of {rule['classes']} classes out "
        f"{rule['repeats']} times: {rule['known_accepted']:.0%} of held-out photos of known "
        f"classes accepted, {rule['unknown_rejected']:.0%} of held-out classes refused, "
        f"AUROC {rule['auroc']:.3f}"
    )


def local_results(results: str) -> str:
    if results.startswith("file:"):
        results = "/" + results[len("file:") :].lstrip("/")
    if "://" in results:
        raise UsageError(
            f"{results} is not a local folder: copy the index first, e.g. "
            f"`aws s3 sync {results.rstrip('/')}/ ./Results/ --exclude 'projections/*'`"
        )
    return results
