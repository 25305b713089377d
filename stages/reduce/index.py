"""The search index of RESULTS (format 5): built from the projections in shards, appended to.

``index.json`` (written last, replaced atomically) lists the shards in row order
(:mod:`stages.storage.shards`, written by :mod:`stages.reduce.index_writer`), the labels
their codes name, the ``generation`` (one more at each append), what the rows measure
(:mod:`stages.reduce.index_stats`: recall, neighbour distances, the open-set rule) and,
above the exact-search limit, the IVF index's file ``ivf-<generation>.faiss``
(:mod:`linalg.vectors`).
:func:`build_index` writes a whole new folder from ``RESULTS/projections`` and swaps it
in; :func:`stages.reduce.index_append.append_index` adds the rows of one new projections
file (``watch --results``) as a new generation.

Driver memory: the IVF index while it is built or extended (``n (4k + 8)`` bytes: the
vectors and their ids) and one shard's vectors at a time; the rows' paths, labels and
thumbnails never reach it (a RESULTS on a Hadoop filesystem passes one partition's
shard at a time through the driver's local disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

from linalg.vectors import DEFAULT_NPROBE, EXACT_MAX_ELEMENTS, VectorIndex, add_rows, train_ivf
from stages.base.contract import THUMB_PX
from stages.base.errors import StepFailed, UsageError, explain
from stages.reduce.index_stats import open_set_summary, statistics
from stages.reduce.index_writer import copy_up, index_frame, label_list, write_shards
from stages.storage import hadoopfs
from stages.storage.fs import LocalFileSystem, local_path
from stages.storage.layout import INDEX_DIR, INDEX_META, Results
from stages.storage.outputs import atomic_output
from stages.storage.shards import ShardSet, ShardWriter

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_DIR",
    "FORMAT",
    "build_index",
    "finish_meta",
    "model_files",
    "upload_index",
    "index_step",
    "ann_file",
    "local_results",
    "sha256_hex",
    "write_local_index",
]

# 2: the open-set rule in index.json; 3: the rows in shards, memory-mapped, generations;
# 4: an IVF index instead of an HNSW graph; 5: each shard's keys.npy (a hash of each row's
# path), which samples the open-set reference rows, calibrated in path order (the rule no
# longer follows the partition order).
FORMAT = 5
# A phone photo is at most ~50 MP; more is a decompression bomb for a web service.
MAX_QUERY_PIXELS = 64_000_000


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


def local_results(results: str) -> str:
    """The local folder of ``results`` (the app reads a local RESULTS only)."""
    if results.startswith("file:"):
        results = "/" + results[len("file:") :].lstrip("/")
    if "://" in results:
        raise UsageError(
            f"{results} is not a local folder: copy the index first, e.g. "
            f"`aws s3 sync {results.rstrip('/')}/ ./Results/ --exclude 'projections/*'`"
        )
    return results


def ann_file(generation: int) -> str:
    """The IVF index's file name of a generation."""
    return f"ivf-{generation:05d}.faiss"


def model_files(spark, base: str):
    layout = Results(base)
    if not hadoopfs.exists(spark, layout.projections) or not hadoopfs.exists(
        spark, layout.model_meta
    ):
        raise UsageError(
            f"{base} has no projections/ and pca_model/: give a RESULTS folder of `reduce`"
        )
    arrays = hadoopfs.read_bytes(spark, layout.arrays)
    model = json.loads(hadoopfs.read_bytes(spark, layout.model_meta).decode("utf-8"))
    return sha256_hex(arrays), model


def _dims(model: Dict[str, Any]) -> int:
    for key in ("n_components", "k"):
        if key in model:
            return int(model[key])
    raise UsageError("pca_model/model.json records no number of components")


def _ann(work: str, shards: ShardSet, generation: int, previous=None):
    """The IVF index over ``shards`` (``previous`` extended by the rows it lacks, or
    trained on a sample of them), written to ``work/ivf-<generation>.faiss``."""
    import faiss

    ivf = previous if previous is not None else train_ivf(shards)
    for start, block in shards.blocks():
        end = start + len(block)
        if end <= ivf.ntotal:
            continue
        add_rows(ivf, block[max(0, ivf.ntotal - start) :])
    faiss.write_index(ivf, os.path.join(work, ann_file(generation)))
    return ivf


def finish_meta(
    work: str,
    meta: Dict[str, Any],
    exact_max: int,
    previous=None,
    append: bool = False,
    times: Optional[Dict[str, float]] = None,
) -> Dict[str, Any]:
    """Open the shards of ``meta``, make (or extend ``previous``) the IVF index, write
    ``index.json``; the statistics (the IVF's ``nprobe``, the open-set rule) are measured
    again unless an ``append`` leaves the kind of search, the IVF lists and the labels as
    they were and the rows less than doubled.  ``times`` gets the seconds of the IVF
    index and of the statistics."""
    times = {} if times is None else times
    t0 = time.perf_counter()
    shards = ShardSet(work, meta["shards"], meta["labels"])
    n, gen = len(shards), meta["generation"]
    meta["rows"] = n
    meta["thumbnails"]["missing"] = sum(int(s["missing"]) for s in meta["shards"])
    ann = None
    if n * meta["dims"] > exact_max:
        trained = (meta.get("ivf") or {}).get("trained_rows", 0)
        if previous is not None and n >= 2 * trained:
            previous = None  # the lists' k-means saw under half the rows: train again
        ann = _ann(work, shards, gen, previous)
        if previous is None:
            trained = n
        old = meta.get("ivf") or {}
        meta["ivf"] = {"file": ann_file(gen), "lists": int(ann.nlist), "trained_rows": trained}
        meta["ivf"]["bytes"] = os.path.getsize(os.path.join(work, ann_file(gen)))
        if "nprobe" in old and previous is not None:
            meta["ivf"]["nprobe"] = old["nprobe"]
    else:
        meta.pop("ivf", None)
    index = VectorIndex(shards, ann, (meta.get("ivf") or {}).get("nprobe", DEFAULT_NPROBE))
    meta["kind"] = index.kind
    times["ann"] = time.perf_counter() - t0
    last = meta.get("statistics_rows") or 0
    same_labels = meta.get("statistics_labels") == len(meta["labels"])
    untuned = ann is not None and "nprobe" not in meta["ivf"]
    if (
        not append
        or untuned
        or meta.get("statistics_kind") != index.kind
        or n >= 2 * last
        or not same_labels
    ):
        statistics(meta, index, shards, gen)
        meta["statistics_rows"], meta["statistics_kind"] = n, index.kind
        meta["statistics_labels"] = len(meta["labels"])
    times["statistics"] = time.perf_counter() - t0 - times["ann"]
    LocalFileSystem().write_bytes(os.path.join(work, INDEX_META), _meta_bytes(meta))
    return meta


def _meta_bytes(meta: Dict[str, Any]) -> bytes:
    """``index.json``: ``meta`` without the seconds things took (returned, not written),
    so that the same projections give the same index, byte for byte."""
    rule = {k: v for k, v in meta["open_set"].items() if k != "calibration_s"}
    return json.dumps({**meta, "open_set": rule}, indent=2).encode()


def build_index(
    spark, results: str, chunk_rows: Optional[int] = None, exact_max_elements: Optional[int] = None
) -> Dict[str, Any]:
    """Build ``RESULTS/index/`` from ``RESULTS/projections`` (their ``thumb`` included).

    Written beside and swapped in (:func:`stages.storage.outputs.atomic_output`): a failed build
    leaves the previous index in place.  ``chunk_rows``: rows per write of a shard
    (default: Spark's Arrow batch).  Returns ``index.json``'s content.
    """
    base = results.rstrip("/")
    exact_max = EXACT_MAX_ELEMENTS if exact_max_elements is None else exact_max_elements
    t0 = time.perf_counter()
    sha, model = model_files(spark, base)
    dims = _dims(model)
    df = index_frame(spark, Results(base).projections)
    labels = label_list(df)
    if not labels:
        raise UsageError(f"{results}/projections has no rows: nothing to index")
    with atomic_output(spark, Results(base).index, overwrite=True) as target:
        local = local_path(target)
        work = local if local is not None else _temp()
        os.makedirs(work, exist_ok=True)
        try:
            times = {"labels": time.perf_counter() - t0}
            shards = write_shards(
                spark, df, work, labels, dims, "g00001-", local is None, chunk_rows
            )
            times["shards"] = time.perf_counter() - t0 - times["labels"]
            meta: Dict[str, Any] = {
                "format": FORMAT,
                "generation": 1,
                "dims": dims,
                "exact_max_elements": exact_max,
                "pca_arrays_sha256": sha,
                "features_model": model.get("features_model") or {},
                "labels": labels,
                "shards": shards,
                "thumbnails": {"px": THUMB_PX},
            }
            meta = finish_meta(work, meta, exact_max, times=times)
            if local is None:
                t_up = time.perf_counter()
                upload_index(spark, work, target)
                times["upload"] = time.perf_counter() - t_up
        finally:
            if local is None:
                shutil.rmtree(work, ignore_errors=True)
    # Not in index.json: the same projections give the same index, byte for byte.
    meta["build_s"] = time.perf_counter() - t0
    meta["build_steps_s"] = times
    _warn_missing(meta)
    logger.info(
        f"index: {meta['rows']} rows, {len(meta['shards'])} shards, {meta['kind']} search, "
        f"recall@10 {meta['recall_at_10']:.3f}, {meta['build_s']:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in times.items())})"
    )
    logger.info(f"index: {open_set_summary(meta['open_set'])}")
    return meta


def _warn_missing(meta: Dict[str, Any]) -> None:
    missing = meta["thumbnails"]["missing"]
    if missing:
        logger.warning(
            f"index: {missing} of {meta['rows']} rows have no thumbnail (error rows, or "
            "features made before featurize kept thumbnails: `featurize --overwrite` adds them)"
        )


def _temp() -> str:
    return tempfile.mkdtemp(prefix="fruits-index-")


def upload_index(spark, work: str, target: str, names: Optional[List[str]] = None) -> None:
    """Copy ``work``'s files (or ``names``) up to ``target``, ``index.json`` last."""
    names = names if names is not None else sorted(os.listdir(work))
    for name in sorted(names, key=lambda n: n == INDEX_META):
        copy_up(spark, os.path.join(work, name), f"{target}/{name}")


def index_step(spark, results: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    """Build the index of a committed RESULTS and record it in its ``summary.json``
    (``summary`` is updated: ``index``, ``timings_s.index``).

    Raises
    ------
    StepFailed
        Whatever made the build fail, in one line that says the projections and the
        model are kept and how to build the index again.
    """
    t0 = time.perf_counter()
    try:
        meta = build_index(spark, results)
    except Exception as exc:  # any failure: the PCA's work is committed, say how to go on
        why = explain(exc)[1].removeprefix("the run failed: ")
        raise StepFailed(
            f"the index step failed ({why}); the projections and the PCA model are "
            f"committed in {results}: build the index with `fruits-pipeline index {results}`"
        ) from exc
    summary["index"] = meta
    summary["timings_s"]["index"] = time.perf_counter() - t0
    base = results.rstrip("/")
    hadoopfs.write_text(spark, f"{base}/summary.json", json.dumps(summary, indent=2))
    return meta


def write_local_index(
    folder: str,
    paths: List[str],
    labels: List[str],
    vectors,
    thumbs: List[Optional[bytes]],
    pca_arrays_sha256: str,
    features_model: Dict[str, Any],
    exact_max_elements: Optional[int] = None,
    shard_rows: Optional[int] = None,
) -> Dict[str, Any]:
    """``folder/index/`` from rows in memory, without Spark (tests and benchmarks): the
    same shards and ``index.json`` a build writes, ``shard_rows`` rows a shard."""

    work = os.path.join(folder, INDEX_DIR)
    names = sorted(set(labels))
    code = {lab: i for i, lab in enumerate(names)}
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dims = vectors.shape
    step = shard_rows or max(n, 1)
    shards = []
    for s in range(0, n, step):
        name = f"g00001-{s // step:05d}"
        w = ShardWriter(os.path.join(work, "shards", name), dims)
        w.add(vectors[s : s + step], [code[x] for x in labels[s : s + step]],
              paths[s : s + step], thumbs[s : s + step])  # fmt: skip
        shards.append({"name": name, **w.close()})
    exact_max = EXACT_MAX_ELEMENTS if exact_max_elements is None else exact_max_elements
    meta: Dict[str, Any] = {
        "format": FORMAT,
        "generation": 1,
        "dims": dims,
        "exact_max_elements": exact_max,
        "pca_arrays_sha256": pca_arrays_sha256,
        "features_model": features_model,
        "labels": names,
        "shards": shards,
        "thumbnails": {"px": THUMB_PX},
    }
    return finish_meta(work, meta, exact_max)
