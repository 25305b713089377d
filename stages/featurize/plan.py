"""The plan of a ``featurize --incremental`` run, computed by Spark from metadata only.

The listing (path, size, modification time) is joined with the rows already committed:
each path is ``new``, ``changed``, ``same``, ``gone`` or (with ``--prune``) ``pruned``.
No image bytes are read to make it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from stages.base.contract import IMAGE_NAME
from stages.featurize.frame import (
    empty_file_rows,
    escape_glob,
    paths_are_url_encoded,
    read_images,
)
from stages.featurize.listing import file_uri, listing_table, walk_images
from stages.featurize.model import ModelSpec
from stages.storage import hadoopfs
from stages.storage.fetch import StoreSettings
from stages.storage.fs import local_path
from stages.storage.s3list import listing_of


def qualified_prefix(spark, uri: str) -> str:
    return hadoopfs.qualified(spark, uri).rstrip("/") + "/"


def status_column(written_ms: Dict[str, Optional[int]]):
    """The plan's ``status`` of a (listing full-outer-join old rows) row: ``new``, ``gone``,
    ``changed`` or ``same``.  Rows of runs written before sizes were recorded (no
    ``old_length``) count as changed when the file is newer than their run; rows with a
    size and no time (from ``--queue``, whose events carry no object time) when the size
    differs or the file is newer than their run."""
    from pyspark.sql import functions as F

    written = (
        F.create_map(
            *[x for r, ms in written_ms.items() if ms is not None for x in (F.lit(r), F.lit(ms))]
        )
        if any(ms is not None for ms in written_ms.values())
        else None
    )
    mtime_ms = (F.unix_micros(F.col("modificationTime")) / 1000).cast("long")
    newer = (
        mtime_ms > F.coalesce(written[F.col("run")], F.lit(0))
        if written is not None
        else F.lit(False)
    )
    sized = F.col("old_length").isNotNull()
    timed = F.col("old_mtime").isNotNull()
    changed_cond = (
        F.col("length").isNotNull()
        & F.col("run").isNotNull()
        & (
            (
                sized
                & timed
                & (
                    (F.col("length") != F.col("old_length"))
                    | ~F.col("modificationTime").eqNullSafe(F.col("old_mtime"))
                )
            )
            | (sized & ~timed & ((F.col("length") != F.col("old_length")) | newer))
            | (~sized & newer)
        )
    )
    status = (
        F.when(F.col("run").isNull(), F.lit("new"))
        .when(F.col("length").isNull(), F.lit("gone"))
        .when(changed_cond, F.lit("changed"))
        .otherwise(F.lit("same"))
    )
    return status


def make_plan(listing, old, status, prune: bool, prefix: Optional[str]):
    """The plan (cached): each listed or old path with its ``status``, and one job's
    counts by (status, run, zero-byte) with a ``%``-holding path per group."""
    from pyspark.sql import functions as F

    plan = listing.join(old, "path", "full_outer").select(
        "path", "length", "modificationTime", "run", status.alias("status")
    )
    if prune:
        plan = plan.withColumn(
            "status",
            F.when(
                (F.col("status") == "gone") & F.col("path").startswith(prefix),
                F.lit("pruned"),
            ).otherwise(F.col("status")),
        )
    plan = plan.cache()
    # One job for every count: (status, run, zero-byte) groups, and a path holding
    # '%' (to tell how this filesystem spells paths).
    summary = (
        plan.groupBy("status", "run", (F.col("length") == 0).alias("empty"))
        .agg(
            F.count("*").alias("count"),
            F.max(F.when(F.col("path").contains("%"), F.col("path"))).alias("pct"),
        )
        .collect()
    )
    return plan, summary


@dataclass
class Listing:
    """What INPUT holds, from metadata only: ``meta`` (path, length, modificationTime) and
    how many files.  S3: the executors' LISTs (cached); a local folder: the walk of plain
    featurize, read from a Parquet file in ``folder`` (cached); in both the workers fetch
    the photos by name.  A local glob and HDFS: ``images`` is the ``binaryFile`` frame
    (read later for the photos to featurize) and ``files`` what its file index listed."""

    meta: Any
    count: int
    images: Any = None
    files: Any = None
    folder: Optional[str] = None  # a local listing's Parquet file, deleted at release

    def release(self) -> None:
        if self.images is None:
            self.meta.unpersist()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def list_input(spark, input_path: str, settings: Optional[StoreSettings], acc) -> Listing:
    """The :class:`Listing` of ``input_path`` (``settings``: an object store's, else
    ``None``; ``acc``: the accumulator of the run's S3 requests).  A local folder is walked
    as plain featurize walks it; a local glob and ``hdfs:`` are listed by Spark."""
    if settings is not None:
        # The LIST's sizes and times are the plan's: an old photo costs no request at all.
        meta = listing_of(spark, input_path, settings, IMAGE_NAME, acc).cache()
        return Listing(meta, meta.count())
    folder = local_path(input_path)
    if folder is not None and os.path.isdir(folder):
        # Listed by the walk plain featurize uses (hidden names, symlinks, unreadable files:
        # one rule), handed to Spark as a Parquet file: no path crosses py4j.
        import pyarrow.parquet as pq

        local = walk_images(folder)
        tmp = tempfile.mkdtemp(prefix="fruits-listing-")
        try:
            table = listing_table(local)
            pq.write_table(table, os.path.join(tmp, "listing.parquet"))
            meta = spark.read.parquet(escape_glob(file_uri(tmp))).cache()
            return Listing(meta, table.num_rows, folder=tmp)  # counted here: no Spark job
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    images = read_images(spark, input_path)
    files = images._jdf.inputFiles()  # a JVM array: it stays there (empty_file_rows)
    return Listing(images.select("path", "length", "modificationTime"), len(files), images, files)


@dataclass
class Plan:
    """A run's plan: ``frame`` (cached: every listed or old path and its ``status``), the
    counts by status, and the zero-byte files' error rows (``empties``, local disks only:
    the scan drops them)."""

    frame: Any
    summary: List[Any]
    scanned: int
    url_encoded: bool
    empties: Any = None
    counts: Dict[str, int] = field(default_factory=dict)
    empty_todo: int = 0

    @property
    def new(self) -> int:
        return self.counts.get("new", 0)

    @property
    def changed(self) -> int:
        return self.counts.get("changed", 0)

    @property
    def pruned(self) -> int:
        return self.counts.get("pruned", 0)

    @property
    def todo_n(self) -> int:
        """Rows to write for photos: the new and the changed ones."""
        return self.new + self.changed

    @property
    def read_n(self) -> int:
        """Photos to read (the zero-byte ones are error rows without a read)."""
        return self.todo_n - self.empty_todo

    @property
    def superseded(self) -> List[str]:
        """The runs holding rows this run replaces or prunes."""
        return sorted({r["run"] for r in self.summary if r["status"] in ("changed", "pruned")})

    def todo(self):
        """The photos to featurize: path, length, modificationTime."""
        from pyspark.sql import functions as F

        return self.frame.where(F.col("status").isin("new", "changed")).select(
            "path", "length", "modificationTime"
        )

    def release(self) -> None:
        self.frame.unpersist()


def plan_run(
    spark,
    listing: Listing,
    old,
    status,
    prune: bool,
    prefix: Optional[str],
    spec: ModelSpec,
) -> Plan:
    """:func:`make_plan` on ``listing`` and the ``old`` rows, with the zero-byte files a
    local scan drops planned as error rows; the counts of what is to do."""
    from pyspark.sql import functions as F

    frame, summary = make_plan(listing.meta, old, status, prune, prefix)
    scanned = sum(int(r["count"]) for r in summary if r["status"] not in ("gone", "pruned"))
    pct = max((r["pct"] for r in summary if r["pct"]), default=None)
    url_encoded = paths_are_url_encoded(spark, pct)
    empties = None
    if listing.images is not None and listing.count > scanned:
        empties = empty_file_rows(spark, listing.images, listing.files, url_encoded, spec)
        frame.unpersist()
        zero = empties.select(
            "path",
            F.lit(0).cast("long").alias("length"),
            F.lit(None).cast("timestamp").alias("modificationTime"),
        )
        frame, summary = make_plan(listing.meta.unionByName(zero), old, status, prune, prefix)
    summary = [r for r in summary if r["status"] in ("new", "changed", "pruned")]
    counts: Dict[str, int] = {}
    for r in summary:
        counts[r["status"]] = counts.get(r["status"], 0) + int(r["count"])
    # S3: a zero-byte object is an error row of the frame itself.
    empty_todo = 0
    if listing.images is not None:
        empty_todo = sum(int(r["count"]) for r in summary if r["status"] != "pruned" and r["empty"])
    return Plan(frame, summary, scanned, url_encoded, empties, counts, empty_todo)
