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
There is one mirror per index folder, and it holds only what the current ``index.json``
names (about the index's size on disk): a file it no longer names is deleted, before and
after each append; an index rebuilt since (another PCA or other first shards, recorded in
the mirror's ``mirror.json``) empties the mirror first; a file whose size differs from
``index.json``'s is downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Set, Tuple

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
from stages.storage.fs import LocalFileSystem, local_path
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
    if remote:
        made = [f"shards/{s['name']}" for s in new] + [INDEX_META]
        if "ivf" in meta:
            made.append(meta["ivf"]["file"])
        upload_index(spark, work, folder, made)  # index.json last
        remote_names = [name for name, _, _, _ in hadoopfs.list_dir(spark, folder)]
        for name in _old_ann_files(remote_names, gen):
            hadoopfs.delete(spark, f"{folder}/{name}")
        _prune_mirror(work, meta)  # no serve reads the mirror: the previous IVF file too
    else:
        for name in _old_ann_files(os.listdir(work), gen):
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


# In a mirror, beside the index's files: which index it mirrors (see mirror_folder).
MIRROR_META = "mirror.json"


def _named(meta: Dict[str, Any]) -> Tuple[Set[str], Set[str]]:
    """The top-level files and the shards ``meta`` (an ``index.json``) names."""
    files = {INDEX_META, MIRROR_META}
    if meta.get("ivf"):
        files.add(meta["ivf"]["file"])
    return files, {s["name"] for s in meta["shards"]}


def _prune_mirror(work: str, meta: Dict[str, Any]) -> List[str]:
    """Delete what the mirror ``work`` holds that ``meta`` does not name (the shards and IVF
    files of earlier generations or of an append that died); the names deleted."""
    files, shards = _named(meta)
    gone = []
    for name in sorted(os.listdir(work)):
        path = os.path.join(work, name)
        if name == "shards" and os.path.isdir(path):
            for shard in sorted(os.listdir(path)):
                if shard not in shards:
                    _remove(os.path.join(path, shard))
                    gone.append(f"shards/{shard}")
        elif name not in files:
            _remove(path)
            gone.append(name)
    return gone


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def mirror_folder(spark, folder: str, meta: Dict[str, Any]) -> str:
    """The driver's local mirror of the index at ``folder`` (a Hadoop URI), holding every
    shard and the IVF file of ``meta`` (downloaded where missing or of another size) and
    nothing else: one mirror per folder, emptied when the index was rebuilt since.
    """
    source = hadoopfs.qualified(spark, folder)
    first = [s for s in meta["shards"] if s["name"].startswith("g00001-")]
    # What stays the same while the index is only appended to: its PCA and first shards.
    identity = {"source": source, "pca_arrays_sha256": meta["pca_arrays_sha256"], "first": first}
    work = str(cache_root() / "index" / hashlib.sha256(source.encode()).hexdigest()[:24])
    record = os.path.join(work, MIRROR_META)
    try:
        with open(record, encoding="utf-8") as fh:
            mirrored = json.load(fh)
    except (OSError, ValueError):
        mirrored = None
    if mirrored != identity and os.path.isdir(work):
        # Another index at that place (rebuilt): none of its files can be trusted.
        logger.info(f"index: {folder} was rebuilt: emptying its mirror {work}")
        shutil.rmtree(work)
    os.makedirs(os.path.join(work, "shards"), exist_ok=True)
    if mirrored != identity:
        LocalFileSystem().write_bytes(record, json.dumps(identity, indent=2).encode())
    gone = _prune_mirror(work, meta)
    if gone:
        logger.info(f"index: {len(gone)} files no longer in {folder} deleted from its mirror")
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
