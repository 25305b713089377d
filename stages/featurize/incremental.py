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

from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams
from stages.base.progress import Progress
from stages.base.sparkutil import session_conf
from stages.featurize.frame import (
    RunReport,
    choose_partitions,
    escape_glob,
    featurize_frame,
    prepare_features_model,
    require_input,
    write_features,
)
from stages.featurize.plan import (
    Listing,
    Plan,
    list_input,
    plan_run,
    qualified_prefix,
    status_column,
)
from stages.featurize.queue import QueueReport, featurize_from_queue
from stages.storage.fetch import StoreSettings, is_object_store, store_settings
from stages.storage.s3list import RunRequests
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
    # Incremental by definition (so `overwrite` is refused, `prune` allowed).
    params = FeaturizeParams.of(params, **{**options, "incremental": True})
    if params.queue:
        return featurize_from_queue(spark, input_path, output_path, params, params.queue)
    if params.prune and any(c in input_path for c in "{}[]*?"):
        raise UsageError(
            f"--prune needs a plain INPUT folder, not the glob {input_path}: "
            "it drops the rows of images no longer under it"
        )
    run = _Run.start(spark, input_path, output_path, params)
    with ExitStack() as cleanup:
        with session_conf(spark, _planning_conf(spark)):
            listing = list_input(spark, input_path, run.settings, run.tally.acc)
            cleanup.callback(listing.release)
            if listing.count == 0 and not params.prune:
                raise UsageError(
                    f"no .jpg/.jpeg images under {input_path}: expected <Class>/<image>.jpg files"
                )
            plan = run.plan(listing)
            cleanup.callback(plan.release)
        logger.info(
            f"featurize: {listing.count} images under {input_path}: {plan.new} new, "
            f"{plan.changed} changed, {listing.count - plan.todo_n} already featurized"
            + (f", {plan.pruned} rows to prune" if params.prune else "")
        )
        if plan.todo_n == 0 and plan.pruned == 0:
            logger.info(f"featurize: nothing new for {output_path}: no run written")
            return run.report(None, listing, plan)
        report = run.write_and_commit(listing, plan)
    logger.info(
        f"featurize: committed run {report.run}: {report.images} images featurized "
        f"({report.errors} errors), {report.pruned} pruned, {report.carried} rows carried "
        f"over, in {report.seconds:.1f} s"
    )
    return report


def _planning_conf(spark) -> Dict[str, str]:
    # Planning reads file metadata only: pack the listing into one task per core
    # (Spark's default 4 MB open cost per file made ~30-file tasks: 2.7 s of tasks
    # for 1100 files here), and let the plan's join shuffle into few partitions.
    return {
        "spark.sql.files.openCostInBytes": "1",
        "spark.sql.files.maxPartitionBytes": str(2**40),
        "spark.sql.shuffle.partitions": str(spark.sparkContext.defaultParallelism),
    }


@dataclass
class _Run:
    """One ``--incremental`` run: what it reads, with which model, into which table."""

    spark: Any
    input_path: str
    output_path: str
    params: FeaturizeParams
    settings: Optional[StoreSettings]
    tally: RunRequests
    spec: Any
    payload: Any
    batch_size: int
    table: FeaturesTable
    base: Any
    records: List[Dict[str, Any]]
    t0: float

    @classmethod
    def start(cls, spark, input_path: str, output_path: str, params: FeaturizeParams) -> _Run:
        t0 = time.perf_counter()
        settings = store_settings(spark) if is_object_store(input_path) else None
        tally = RunRequests(spark, settings, [input_path, output_path])
        require_input(spark, input_path)
        spec, payload, batch_size = prepare_features_model(params)
        table = FeaturesTable(spark, output_path).open_for_append(spec)
        base = table.head()  # before reading the table: the commit checks what came after
        return cls(
            spark, input_path, output_path, params, settings, tally, spec, payload,
            batch_size, table, base, table.records(), t0,
        )  # fmt: skip

    def plan(self, listing: Listing) -> Plan:
        """The plan against the table's live rows (metadata only)."""
        from pyspark.sql import functions as F

        live = self.table.live_runs(self.records)
        # When each run's rows were written: an image no newer than that is the one they
        # describe, for rows that record no time (a migrated table's, the queue's).
        written_ms = {
            r["run"]: r.get("written_ms") or _iso_ms(r.get("committed")) for r in self.records
        }
        old = self.table.read_runs(live, self.spec).select(
            "path",
            F.col("length").alias("old_length"),
            F.col("modificationTime").alias("old_mtime"),
            "run",
        )
        prefix = qualified_prefix(self.spark, self.input_path) if self.params.prune else None
        status = status_column(written_ms)
        return plan_run(self.spark, listing, old, status, self.params.prune, prefix, self.spec)

    def report(
        self, run_id: Optional[str], listing: Listing, plan: Plan, **done: Any
    ) -> IncrementalReport:
        return IncrementalReport(
            self.input_path,
            self.output_path,
            run_id,
            listing.count,
            plan.new if run_id else 0,
            plan.changed if run_id else 0,
            plan.pruned if run_id else 0,
            done.get("carried", 0),
            done.get("images", 0),
            done.get("errors", 0),
            time.perf_counter() - self.t0,
            done.get("scan", "none"),
            plan.superseded if run_id else [],
            self.tally.total(),
        )

    def _source(self, listing: Listing, plan: Plan, todo, n_parts: int):
        """How the photos to featurize are read: ``(scan, DataFrame)``."""
        from pyspark.sql import functions as F

        if listing.images is None:
            # The workers read the new photos by name (one GET each on S3): nothing else.
            return "fetch", todo.select("path", "length").repartition(n_parts)
        to_read = todo.where(F.col("length") > 0)
        if plan.read_n > _SCAN_ALL_SHARE * max(1, plan.scanned):
            return "all", listing.images.join(
                F.broadcast(to_read.select("path")), "path", "left_semi"
            )
        names = [escape_glob(r[0]) for r in to_read.select("path").collect()]
        # Spark lists many named files with one task per file: a few tasks do.
        tasks = str(max(2, 2 * self.spark.sparkContext.defaultParallelism))
        with session_conf(
            self.spark, {"spark.sql.sources.parallelPartitionDiscovery.parallelism": tasks}
        ):
            return "by-name", self.spark.read.format("binaryFile").load(names)

    def _carried(self, plan: Plan):
        """The rows of the superseded runs that stay (their photos unchanged)."""
        from pyspark.sql import functions as F

        dropped = plan.frame.where(F.col("status").isin("changed", "pruned")).select("path")
        carried = self.table.read_runs(plan.superseded, self.spec).join(
            dropped, "path", "left_anti"
        )
        # Rows of a plain featurize output have no size or time; the plan found their
        # images unchanged, so they take the listing's: else, carried into a run that
        # records no `written_ms`, every later run would count them as changed.
        listed = plan.frame.select(
            "path", F.col("length").alias("_l"), F.col("modificationTime").alias("_m")
        )
        return (
            carried.join(listed, "path", "left")
            .withColumn("length", F.coalesce("length", "_l"))
            .withColumn("modificationTime", F.coalesce("modificationTime", "_m"))
            .drop("_l", "_m", "run")
        )

    def write_and_commit(self, listing: Listing, plan: Plan) -> IncrementalReport:
        """Featurize the plan's photos, write them with the carried rows to the staging
        folder, and commit the run (:meth:`FeaturesTable.commit`, checked against
        ``base``)."""
        from pyspark.sql import functions as F

        spark, todo = self.spark, plan.todo()
        run_id, started = new_run_id(), now_iso()
        scan, parts, frame, carried = "none", [], None, 0
        if plan.read_n > 0:
            n_parts = choose_partitions(
                plan.read_n, spark.sparkContext.defaultParallelism, self.params.partitions
            )
            scan, source = self._source(listing, plan, todo, n_parts)
            # Spark reads the bytes only of a scan it listed (a local glob, HDFS).
            fetch = (self.settings or StoreSettings()) if scan == "fetch" else None
            frame = featurize_frame(
                spark, source, self.spec, self.payload, self.batch_size, plan.url_encoded,
                partitions=n_parts, fetch=fetch, requests=self.tally.acc,
            )  # fmt: skip
            parts.append(frame.df.join(F.broadcast(todo), "path"))
        if plan.empties is not None and plan.empty_todo:
            zero = F.broadcast(todo.where(F.col("length") == 0))
            parts.append(plan.empties.join(zero, "path"))
        if plan.superseded:
            carried_df = self._carried(plan)
            carried = carried_df.count()
            parts.append(carried_df)
        out = parts[0]
        for p in parts[1:]:
            out = out.unionByName(p)
        schema = incremental_schema(self.spec)
        out = out.select(*[F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema])
        logger.info(f"featurize: run {run_id}: featurizing {plan.todo_n} images ({scan} scan)")
        with Progress(spark, "featurize", plan.todo_n, "images"):
            write_features(
                spark,
                out,
                self.table.staging_uri(run_id),
                frame.settings if frame is not None else None,
            )
        images = (frame.images if frame is not None else 0) + plan.empty_todo
        errors = (frame.errors if frame is not None else 0) + plan.empty_todo
        if frame is not None:
            frame.release()
        record = RunRecord(
            run=run_id,
            kind="featurize",
            input=self.input_path,
            started=started,
            rows=int(images + carried),
            new=plan.new,
            changed=plan.changed,
            pruned=plan.pruned,
            carried=int(carried),
            errors=int(errors),
            model=self.spec.to_dict(),
            removes=plan.superseded,
            requests=self.tally.total(),  # up to the commit: its own PUT is not in
        )
        self.table.commit(record, self.base)
        return self.report(
            run_id, listing, plan, carried=int(carried), images=int(images),
            errors=int(errors), scan=scan,
        )  # fmt: skip
