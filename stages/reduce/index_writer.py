"""Build ``RESULTS/index/`` on the executors, in shards (:mod:`stages.storage.shards`).

Each partition of ``RESULTS/projections`` (``path, label, pca`` and the ``thumb`` the
features carried) becomes one shard, written by the task that reads it, one Arrow
batch (a chunk of ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) at a time.
The driver gets one small row per shard (its name and counts) and then holds what
the index itself must hold: the IVF index over the vectors, which it builds from
the shards' memory-mapped vectors, shard by shard.  A RESULTS on a Hadoop
filesystem (``s3a://``, ``hdfs:``) gets its shards through the driver's local disk,
one partition at a time (``toLocalIterator``), and the finished folder is copied up
by Hadoop's ``copyFromLocalFile``: no file's bytes cross py4j.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from stages.base.sparkutil import session_conf
from stages.storage.shards import SHARD_FILES, ShardWriter

logger = logging.getLogger(__name__)

__all__ = ["index_frame", "label_list", "write_shards", "copy_down", "copy_up"]

_SUMMARY = "shard string, part int, rows long, missing long, bytes long"
_RELAY = "shard string, part int, file string, content binary"


def index_frame(spark, projections: str):
    """``projections`` as ``path, label, pca, thumb`` (``thumb`` null where the
    projections carry none: features made before thumbnails)."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(projections)
    thumb = F.col("thumb") if "thumb" in df.columns else F.lit(None).cast("binary")
    return df.select("path", "label", "pca", thumb.alias("thumb"))


def label_list(df, known: Sequence[str] = ()) -> List[str]:
    """``known`` then the other labels of ``df``, sorted (one small aggregation: a row
    per class reaches the driver)."""
    seen = set(known)
    found = sorted(r[0] for r in df.select("label").distinct().collect())
    return list(known) + [lab for lab in found if lab not in seen]


def _shard_task(folder: Optional[str], dims: int, labels: List[str], prefix: str):
    """The ``mapInArrow`` function: write a partition's shard, yield one summary row
    (``folder`` local), or the shard's files as rows (``folder`` None: the relay)."""

    def run(batches):
        import pyarrow as pa
        import pyarrow.compute as pc
        from pyspark import TaskContext

        part = TaskContext.get().partitionId()
        name = f"{prefix}{part:05d}"
        root = folder if folder is not None else tempfile.mkdtemp(prefix="fruits-shard-")
        writer = None
        value_set = pa.array(labels, pa.string())
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                if writer is None:
                    writer = ShardWriter(os.path.join(root, name), dims)
                pca = batch.column("pca")
                lengths = pc.list_value_length(pca).to_numpy(zero_copy_only=False)
                if pca.null_count or (lengths != dims).any():
                    raise ValueError(
                        f"projections with vectors of lengths {set(lengths)}, not {dims}"
                    )
                vectors = pca.flatten().to_numpy(zero_copy_only=False).reshape(-1, dims)
                codes = pc.index_in(batch.column("label"), value_set=value_set)
                writer.add(
                    vectors,
                    codes.to_numpy(zero_copy_only=False),
                    batch.column("path").to_pylist(),
                    batch.column("thumb").to_pylist(),
                )
            if writer is None:
                return
            info = writer.close()
            writer = None
            if folder is not None:
                cols = [
                    pa.array([name]),
                    pa.array([part], pa.int32()),
                    *[pa.array([info[c]], pa.int64()) for c in ("rows", "missing", "bytes")],
                ]
                yield pa.RecordBatch.from_arrays(
                    cols, ["shard", "part", "rows", "missing", "bytes"]
                )
                return
            # The relay: the summary first, then the files one row each.
            summary = json.dumps({"name": name, **info}).encode()
            for file, read in [("_summary", lambda: summary)] + [
                (f, (lambda f=f: open(os.path.join(root, name, f), "rb").read()))
                for f in SHARD_FILES
            ]:
                yield pa.RecordBatch.from_arrays(
                    [pa.array([name]), pa.array([part], pa.int32()), pa.array([file]),
                     pa.array([read()], pa.binary())],
                    ["shard", "part", "file", "content"],
                )  # fmt: skip
        finally:
            if writer is not None:
                writer.abort()
            if folder is None:
                shutil.rmtree(root, ignore_errors=True)

    return run


def write_shards(
    spark,
    df,
    work: str,
    labels: List[str],
    dims: int,
    prefix: str = "p",
    relay: bool = False,
    chunk_rows: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Write ``df`` (:func:`index_frame`) as shards under the local ``work/shards``.

    Parameters
    ----------
    work : str
        A local folder the executors can write (``relay`` False) or the driver's
        own (``relay`` True: the shards come through it one partition at a time).
    labels : list of str
        The label codes' names (every label of ``df`` among them).
    prefix : str
        Shard names are ``<prefix><partition:05d>``.
    chunk_rows : int, optional
        Rows per Arrow batch, so per write (default: Spark's, 10,000).

    Returns
    -------
    list of dict
        ``name, rows, missing, bytes`` of each shard, in partition order.
    """
    shards = os.path.join(work, "shards")
    os.makedirs(shards, exist_ok=True)
    settings = {}
    if chunk_rows is not None:
        settings["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(chunk_rows)
    task = _shard_task(None if relay else shards, dims, labels, prefix)
    out: List[Dict[str, Any]] = []
    with session_conf(spark, settings):
        if not relay:
            for r in df.mapInArrow(task, _SUMMARY).collect():
                out.append({"name": r["shard"], "part": r["part"], "rows": r["rows"],
                            "missing": r["missing"], "bytes": r["bytes"]})  # fmt: skip
        else:
            for r in df.mapInArrow(task, _RELAY).toLocalIterator():
                if r["file"] == "_summary":
                    out.append({**json.loads(bytes(r["content"])), "part": r["part"]})
                    continue
                os.makedirs(os.path.join(shards, r["shard"]), exist_ok=True)
                with open(os.path.join(shards, r["shard"], r["file"]), "wb") as fh:
                    fh.write(r["content"])
    out.sort(key=lambda s: s["part"])
    return [{k: v for k, v in s.items() if k != "part"} for s in out]


def _hadoop_path(spark, uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


def copy_down(spark, uri: str, local: str) -> None:
    """Copy the file or folder ``uri`` to the local ``local`` with Hadoop (no bytes over
    py4j, no ``.crc`` files)."""
    jvm = spark.sparkContext._jvm
    fs, src = _hadoop_path(spark, uri)
    fs.copyToLocalFile(False, src, jvm.org.apache.hadoop.fs.Path("file://" + local), True)


def copy_up(spark, local: str, uri: str) -> None:
    """Copy the local file or folder ``local`` to ``uri`` with Hadoop (no bytes over py4j)."""
    jvm = spark.sparkContext._jvm
    fs, dst = _hadoop_path(spark, uri)
    fs.copyFromLocalFile(False, True, jvm.org.apache.hadoop.fs.Path("file://" + local), dst)
