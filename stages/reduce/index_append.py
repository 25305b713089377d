"""``watch --results``: the rows of one new projections file added to ``RESULTS/index/``.

An append writes the new rows as new shards, adds their vectors to the IVF lists (trained
again once the rows have doubled since its k-means) and writes the next generation's
``index.json`` last: a running ``serve`` sees it change and loads it, and no file of an
earlier generation is written again.

On a local disk the index is extended where it is.  On a Hadoop filesystem (S3 on EMR) the
driver extends a **mirror** of the index on its own disk (``<cache>/index/<key>``, under
:func:`stages.base.cache.cache_root`) and uploads only what the append made: the new
shards, the new IVF file and ``index.json``.  The first append of a driver downloads the
shards its mirror lacks (once: the index's size on disk); each later one finds them there.
The mirror's key names the index's first generation (its PCA and first shards), so a
rebuilt index gets a mirror of its own, and a file whose size differs from ``index.json``'s
is downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional

from stages.base.cache import cache_root
from stages.reduce.index import (
    FORMAT,
    build_index,
    finish_meta,
    model_files,
    upload_index,
)
from stages.reduce.index_writer import copy_down, index_frame, label_list, write_shards
from stages.storage import hadoopfs
from stages.storage.fs import local_path
from stages.storage.layout import INDEX_META, Results
from stages.storage.shards import shard_bytes

logger = logging.getLogger(__name__)

__all__ = ["append_index", "mirror_folder"]


def append_index(spark, results: str, projections: str) -> Optional[Dict[str, Any]]:
    """Add the rows of ``projections`` (one file of a ``watch --results`` run, projected
    with the index's own PCA) to ``RESULTS/index/`` as a new generation.

    Returns the new ``index.json`` content, or None when there is no index to extend
    (``fruits-pipeline index RESULTS`` builds one).
    """
    import faiss

    base = results.rstrip("/")
    folder = Results(base).index
    if not hadoopfs.exists(spark, Results(base).index_meta):
        return None
    t0 = time.perf_counter()
    meta = json.loads(hadoopfs.read_text(spark, Results(base).index_meta))
    sha, _ = model_files(spark, base)
    if meta.get("format") != FORMAT or meta.get("pca_arrays_sha256") != sha:
        logger.warning(f"index: {folder} is of another PCA or format: rebuilding it")
        return build_index(spark, results)
    work = local_path(folder)
    remote = work is None
    if remote:
        work = mirror_folder(spark, folder, meta)
    df = index_frame(spark, projections)
    labels = label_list(df, meta["labels"])
    gen = int(meta["generation"]) + 1
    new = write_shards(spark, df, work, labels, meta["dims"], f"g{gen:05d}-", relay=remote)
    if not new:
        return meta
    previous = None
    if meta.get("kind") == "faiss-ivf":
        previous = faiss.read_index(os.path.join(work, meta["ivf"]["file"]))
    meta.update(labels=labels, shards=meta["shards"] + new, generation=gen)
    meta["appended_rows"] = int(meta.get("appended_rows", 0)) + sum(s["rows"] for s in new)
    meta = finish_meta(work, meta, int(meta["exact_max_elements"]), previous, append=True)
    old = _old_ann_files(os.listdir(work), gen)
    if remote:
        made = [f"shards/{s['name']}" for s in new] + [INDEX_META]
        if "ivf" in meta:
            made.append(meta["ivf"]["file"])
        upload_index(spark, work, folder, made)  # index.json last
        remote_names = [name for name, _, _, _ in hadoopfs.list_dir(spark, folder)]
        for name in _old_ann_files(remote_names, gen):
            hadoopfs.delete(spark, f"{folder}/{name}")
    for name in old:
        os.unlink(os.path.join(work, name))
    meta["append_s"] = time.perf_counter() - t0
    logger.info(
        f"index: generation {gen}: {meta['rows']} rows (+{sum(s['rows'] for s in new)}), "
        f"{meta['kind']}, {meta['append_s']:.1f} s"
    )
    return meta


def _old_ann_files(names: List[str], generation: int) -> List[str]:
    """The IVF files older than the previous generation (a serve that has not reloaded
    yet uses the previous one)."""
    old = []
    for name in names:
        if name.startswith("ivf-") and name.endswith(".faiss"):
            if int(name[len("ivf-") : -len(".faiss")]) < generation - 1:
                old.append(name)
    return old


def mirror_folder(spark, folder: str, meta: Dict[str, Any]) -> str:
    """The driver's local mirror of the index at ``folder`` (a Hadoop URI), with every
    shard and the IVF file of ``meta`` in it (downloaded where missing or of another size).
    """
    first = [s for s in meta["shards"] if s["name"].startswith("g00001-")]
    key = json.dumps([hadoopfs.qualified(spark, folder), meta["pca_arrays_sha256"], first])
    work = str(cache_root() / "index" / hashlib.sha256(key.encode()).hexdigest()[:24])
    os.makedirs(os.path.join(work, "shards"), exist_ok=True)
    fetched = 0
    for shard in meta["shards"]:
        local = os.path.join(work, "shards", shard["name"])
        if os.path.isdir(local) and shard_bytes(local) == int(shard["bytes"]):
            continue
        shutil.rmtree(local, ignore_errors=True)
        copy_down(spark, f"{folder}/shards/{shard['name']}", local)
        fetched += 1
    ivf = meta.get("ivf")
    if ivf is not None:
        local = os.path.join(work, ivf["file"])
        if not os.path.isfile(local) or os.path.getsize(local) != int(ivf.get("bytes", -1)):
            copy_down(spark, f"{folder}/{ivf['file']}", local)
            fetched += 1
    if fetched:
        logger.info(f"index: {fetched} files of {folder} fetched into the mirror {work}")
    return work
