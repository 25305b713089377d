"""The plan of a ``featurize --incremental`` run, computed by Spark from metadata only.

The listing (path, size, modification time) is joined with the rows already committed:
each path is ``new``, ``changed``, ``same``, ``gone`` or (with ``--prune``) ``pruned``.
No image bytes are read to make it.
"""

from __future__ import annotations

from typing import Dict, Optional

from stages.storage import hadoopfs


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
