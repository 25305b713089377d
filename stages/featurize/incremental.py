"""A features table that grows: ``featurize --incremental`` and its run manifest.

Layout of an incremental ``FEATURES`` folder (one table for every reader)::

    FEATURES/
      run=20261201T081858123Z-a1b2c3/part-*.parquet   rows committed by one run
      run=20261202T060000456Z-d4e5f6/part-*.parquet
      _runs/00000001.json                             what that run did (the manifest)
      _staging/run=.../                               a run being written (or aborted)

Spark (``spark.read.parquet(FEATURES)``), pyarrow/pandas (``pq.read_table``) and
DuckDB (``read_parquet('FEATURES/run=*/*.parquet', hive_partitioning=true)``) read
one table with a ``run`` column (the run that wrote the row); they skip ``_runs``
and ``_staging`` (names starting with ``_``).  Rows written by an incremental run
also carry ``length`` and ``modificationTime`` of the image they came from, which
is how a later run knows that an image was replaced.

Commit protocol of a run:

1. Spark writes the run's rows to ``_staging/run=ID/`` (its own commit protocol);
2. ``_runs/<n>.json`` is created, ``n`` one more than the records the run was planned
   on, only if no other writer created it meanwhile (a hard link locally, a conditional
   PUT on S3, a rename on HDFS: :mod:`stages.storage.claim`): **the commit point**.  A
   run that loses the race commits at ``n + 1`` if the winner's photos are not its own,
   else it is refused with one line and its staging is deleted;
3. ``_staging/run=ID`` is renamed to ``run=ID`` and the runs it supersedes (rows
   replaced or pruned) are deleted.

A run that dies before 2 leaves the table as it was (its staging folder is
deleted by the next run); one that dies after 2 is rolled forward by the next
run (:meth:`FeaturesTable.recover`): every image keeps exactly one row.  Rename is
atomic on local disks and HDFS; on S3 it is a copy per object, so a plain-folder
reader may see a run half-moved while step 3 runs (the manifest is exact).

A run that replaces or prunes rows rewrites the runs holding them: their kept
rows move into the new run's folder and the old folders are deleted, so no
Parquet file is ever modified in place (a ``reduce --update`` sees files vanish
and falls back to a full pass).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Union

from stages.base.contract import IMAGE_NAME
from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams
from stages.base.progress import Progress
from stages.base.sparkutil import session_conf
from stages.featurize.frame import (
    RunReport,
    choose_partitions,
    empty_file_rows,
    escape_glob,
    featurize_frame,
    paths_are_url_encoded,
    prepare_features_model,
    read_images,
    require_input,
    write_features,
)
from stages.featurize.plan import make_plan, qualified_prefix, status_column
from stages.featurize.queue import QueueReport, featurize_from_queue
from stages.storage.fetch import is_object_store, store_settings
from stages.storage.s3list import RunRequests, listing_of
from stages.storage.table import (
    FeaturesTable,
    RunRecord,
    incremental_schema,
    new_run_id,
    now_iso,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FeaturesTable",
    "IncrementalReport",
    "featurize_incremental",
    "new_run_id",
]

# Above this share of the listing to featurize, scanning the whole input beats
# opening each file by name (Spark lists every named path on its own).
_SCAN_ALL_SHARE = 0.5


@dataclass
class IncrementalReport(RunReport):
    """What a ``featurize --incremental`` run did."""

    input: str
    output: str
    run: Optional[str]
    listed: int
    new: int
    changed: int
    pruned: int
    carried: int
    images: int
    errors: int
    seconds: float
    scan: str = "none"
    superseded: List[str] = field(default_factory=list)
    # S3 requests by kind (boto3's operations; S3A's statistics as ``s3a.<name>``).
    requests: Dict[str, int] = field(default_factory=dict)


def _iso_ms(text: Optional[str]) -> Optional[int]:
    """Milliseconds since the epoch of an ISO time (a record's ``committed``)."""
    if not text:
        return None
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def featurize_incremental(
    spark,
    input_path: str,
    output_path: str,
    params: Optional[FeaturizeParams] = None,
    **options: Any,
) -> Union[IncrementalReport, QueueReport]:
    """Featurize only the images not yet in ``output_path`` (or changed since).

    An image is featurized when its path has no row yet, or its size or
    modification time differ from the row's; with ``prune``, rows of images no
    longer under ``input_path`` are dropped.  The run commits atomically (see the
    module docstring); nothing new means nothing written.

    Parameters
    ----------
    spark : SparkSession
    input_path, output_path : str
    params : FeaturizeParams, optional
        As :func:`stages.featurize.frame.featurize` (``incremental`` is implied; ``prune``
        also drops the rows of images no longer under ``input_path``).
    **options
        Fields of :class:`~stages.base.params.FeaturizeParams` given one by one.

    Returns
    -------
    IncrementalReport, or QueueReport with ``queue`` (the photos an SQS queue of S3
    notifications announces: :mod:`stages.featurize.queue`)

    Raises
    ------
    UsageError
        Missing input, features of another model, a glob input with ``prune``.
    """
    from pyspark.sql import functions as F

    # Incremental by definition (so `overwrite` is refused, `prune` allowed).
    params = FeaturizeParams.of(params, **{**options, "incremental": True})
    if params.queue:
        return featurize_from_queue(spark, input_path, output_path, params, params.queue)
    prune, partitions = params.prune, params.partitions
    if prune and any(c in input_path for c in "{}[]*?"):
        raise UsageError(
            f"--prune needs a plain INPUT folder, not the glob {input_path}: "
            "it drops the rows of images no longer under it"
        )
    t0 = time.perf_counter()
    settings = store_settings(spark) if is_object_store(input_path) else None
    tally = RunRequests(spark, settings, [input_path, output_path])
    require_input(spark, input_path)
    spec, weight_arrays, batch_size = prepare_features_model(params)
    table = FeaturesTable(spark, output_path).open_for_append(spec)
    base = table.head()  # before reading the table: the commit checks what came after
    records = table.records()
    live = table.live_runs(records)
    # When each run's rows were written: an image no newer than that is the one they
    # describe, for rows that record no time (a migrated table's, the queue's).
    written_ms = {r["run"]: r.get("written_ms") or _iso_ms(r.get("committed")) for r in records}

    # Planning reads file metadata only: pack the listing into one task per core
    # (Spark's default 4 MB open cost per file made ~30-file tasks: 2.7 s of tasks
    # for 1100 files here), and let the plan's join shuffle into few partitions.
    planning = ExitStack()
    planning.enter_context(
        session_conf(
            spark,
            {
                "spark.sql.files.openCostInBytes": "1",
                "spark.sql.files.maxPartitionBytes": str(2**40),
                "spark.sql.shuffle.partitions": str(spark.sparkContext.defaultParallelism),
            },
        )
    )
    if settings is not None:
        # S3: the executors list (LISTs only, the name rule of every path); the LIST's
        # sizes and times are the plan's, so an old photo costs no request at all.
        images = None
        meta = listing_of(spark, input_path, settings, IMAGE_NAME, tally.acc).cache()
        n_listed = meta.count()
    else:
        images = read_images(spark, input_path)
        meta = images.select("path", "length", "modificationTime")
        listed_files = images._jdf.inputFiles()
        n_listed = len(listed_files)
    if n_listed == 0 and not prune:
        planning.close()
        raise UsageError(
            f"no .jpg/.jpeg images under {input_path}: expected <Class>/<image>.jpg files"
        )

    # The plan, computed by Spark from metadata only (no image bytes are read).
    old = table.read_runs(live, spec).select(
        "path",
        F.col("length").alias("old_length"),
        F.col("modificationTime").alias("old_mtime"),
        "run",
    )
    status = status_column(written_ms)
    prefix = qualified_prefix(spark, input_path) if prune else None

    plan, summary = make_plan(meta, old, status, prune, prefix)
    try:
        n_scanned = sum(int(r["count"]) for r in summary if r["status"] not in ("gone", "pruned"))
        pct = max((r["pct"] for r in summary if r["pct"]), default=None)
        url_encoded = paths_are_url_encoded(spark, pct)
        empties = None
        if images is not None and n_listed > n_scanned:  # zero-byte files the scan drops
            empties = empty_file_rows(spark, images, listed_files, url_encoded, spec)
            plan.unpersist()
            plan, summary = make_plan(
                meta.unionByName(
                    empties.select(
                        "path",
                        F.lit(0).cast("long").alias("length"),
                        F.lit(None).cast("timestamp").alias("modificationTime"),
                    )
                ),
                old,
                status,
                prune,
                prefix,
            )
        planning.close()
        summary = [r for r in summary if r["status"] in ("new", "changed", "pruned")]
        counts: Dict[str, int] = {}
        for r in summary:
            counts[r["status"]] = counts.get(r["status"], 0) + int(r["count"])
        n_new, n_changed = counts.get("new", 0), counts.get("changed", 0)
        n_pruned = counts.get("pruned", 0)
        todo_n = n_new + n_changed
        n_empty_todo = sum(
            int(r["count"]) for r in summary if r["status"] != "pruned" and r["empty"]
        )
        if settings is not None:
            n_empty_todo = 0  # S3: a zero-byte object is an error row of the frame itself
        n_read = todo_n - n_empty_todo
        logger.info(
            f"featurize: {n_listed} images under {input_path}: {n_new} new, {n_changed} changed, "
            f"{n_listed - todo_n} already featurized"
            + (f", {n_pruned} rows to prune" if prune else "")
        )
        if todo_n == 0 and n_pruned == 0:
            logger.info(f"featurize: nothing new for {output_path}: no run written")
            seconds = time.perf_counter() - t0
            return IncrementalReport(
                input_path, output_path, None, n_listed, 0, 0, 0, 0, 0, 0, seconds,
                requests=tally.total(),
            )  # fmt: skip
        superseded = sorted({r["run"] for r in summary if r["status"] in ("changed", "pruned")})
        todo = plan.where(F.col("status").isin("new", "changed")).select(
            "path", "length", "modificationTime"
        )
        run = new_run_id()
        started = now_iso()
        scan = "none"
        parts = []
        frame = None
        n_parts = choose_partitions(n_read, spark.sparkContext.defaultParallelism, partitions)
        if n_read > 0 and settings is not None:
            scan = "fetch"  # the workers GET the new photos by name: nothing else is read
            source = todo.select("path", "length").repartition(n_parts)
        elif n_read > 0:
            to_read = todo.where(F.col("length") > 0)
            if n_read > _SCAN_ALL_SHARE * max(1, n_scanned):
                scan = "all"
                source = images.join(F.broadcast(to_read.select("path")), "path", "left_semi")
            else:
                scan = "by-name"
                names = [escape_glob(r[0]) for r in to_read.select("path").collect()]
                # Spark lists many named files with one task per file: a few tasks do.
                tasks = str(max(2, 2 * spark.sparkContext.defaultParallelism))
                with session_conf(
                    spark, {"spark.sql.sources.parallelPartitionDiscovery.parallelism": tasks}
                ):
                    source = spark.read.format("binaryFile").load(names)
        if n_read > 0:
            frame = featurize_frame(
                spark,
                source,
                spec,
                weight_arrays,
                batch_size,
                url_encoded,
                partitions=n_parts,
                fetch=settings,
                requests=tally.acc,
            )
            parts.append(frame.df.join(F.broadcast(todo), "path"))
        if empties is not None and n_empty_todo:
            parts.append(empties.join(F.broadcast(todo.where(F.col("length") == 0)), "path"))
        carried = 0
        if superseded:
            dropped = plan.where(F.col("status").isin("changed", "pruned")).select("path")
            carried_df = table.read_runs(superseded, spec).join(dropped, "path", "left_anti")
            # Rows of a plain featurize output have no size or time; the plan found their
            # images unchanged, so they take the listing's: else, carried into a run that
            # records no `written_ms`, every later run would count them as changed.
            listed = plan.select(
                "path", F.col("length").alias("_l"), F.col("modificationTime").alias("_m")
            )
            carried_df = (
                carried_df.join(listed, "path", "left")
                .withColumn("length", F.coalesce("length", "_l"))
                .withColumn("modificationTime", F.coalesce("modificationTime", "_m"))
                .drop("_l", "_m")
            )
            carried = carried_df.count()
            parts.append(carried_df.drop("run"))
        out = parts[0]
        for p in parts[1:]:
            out = out.unionByName(p)
        schema = incremental_schema(spec)
        out = out.select(*[F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema])
        staged = table.staging_uri(run)
        logger.info(f"featurize: run {run}: featurizing {todo_n} images ({scan} scan)")
        with Progress(spark, "featurize", todo_n, "images"):
            write_features(spark, out, staged, frame.settings if frame is not None else None)
        images_done = (frame.images if frame is not None else 0) + n_empty_todo
        errors = (frame.errors if frame is not None else 0) + n_empty_todo
        written_rows = images_done + carried
        if frame is not None:
            frame.release()
        record = RunRecord(
            run=run,
            kind="featurize",
            input=input_path,
            started=started,
            rows=int(written_rows),
            new=n_new,
            changed=n_changed,
            pruned=n_pruned,
            carried=int(carried),
            errors=int(errors),
            model=spec.to_dict(),
            removes=superseded,
            requests=tally.total(),  # up to the commit: its own PUT is not in
        )
        table.commit(record, base)
    finally:
        planning.close()
        plan.unpersist()
        if settings is not None:
            meta.unpersist()
    seconds = time.perf_counter() - t0
    report = IncrementalReport(
        input_path,
        output_path,
        run,
        n_listed,
        n_new,
        n_changed,
        n_pruned,
        int(carried),
        int(images_done),
        int(errors),
        seconds,
        scan,
        superseded,
        tally.total(),
    )
    logger.info(
        f"featurize: committed run {run}: {report.images} images featurized "
        f"({report.errors} errors), {report.pruned} pruned, {report.carried} rows carried over, "
        f"in {seconds:.1f} s"
    )
    return report
