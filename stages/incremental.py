"""A features table that grows: ``featurize --incremental`` and its run manifest.

Layout of an incremental ``FEATURES`` folder (one table for every reader)::

    FEATURES/
      run=20261201T081858123Z-a1b2c3/part-*.parquet   rows committed by one run
      run=20261202T060000456Z-d4e5f6/part-*.parquet
      _runs/20261201T081858123Z-a1b2c3.json           what that run did (the manifest)
      _staging/run=.../                               a run being written (or aborted)

Spark (``spark.read.parquet(FEATURES)``), pyarrow/pandas (``pq.read_table``) and
DuckDB (``read_parquet('FEATURES/run=*/*.parquet', hive_partitioning=true)``) read
one table with a ``run`` column (the run that wrote the row); they skip ``_runs``
and ``_staging`` (names starting with ``_``).  Rows written by an incremental run
also carry ``length`` and ``modificationTime`` of the image they came from, which
is how a later run knows that an image was replaced.

Commit protocol of a run (one writer at a time):

1. Spark writes the run's rows to ``_staging/run=ID/`` (its own commit protocol);
2. ``_runs/ID.json`` is written (hidden temporary file renamed into place, a single
   PUT on S3): **the commit point**;
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

import json
import logging
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from stages import hadoopfs
from stages.errors import UsageError
from stages.featurize import RunReport
from stages.params import FeaturizeParams

logger = logging.getLogger(__name__)

__all__ = [
    "RUNS_DIR",
    "STAGING_DIR",
    "FeaturesTable",
    "IncrementalReport",
    "featurize_incremental",
    "new_run_id",
]

RUNS_DIR = "_runs"
STAGING_DIR = "_staging"
RUN_PREFIX = "run="
_GLOB_CHARS = "\\{}[]*?"
# Above this share of the listing to featurize, scanning the whole input beats
# opening each file by name (Spark lists every named path on its own).
_SCAN_ALL_SHARE = 0.5


def new_run_id() -> str:
    """A run id that sorts by time: ``20261201T081858123Z-a1b2c3`` (UTC)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def incremental_schema(spec=None):
    """The features schema plus the image's ``length`` and ``modificationTime``."""
    from pyspark.sql.types import LongType, StructField, TimestampType

    from stages.contract import features_schema

    schema = features_schema(spec)
    schema = schema.add(StructField("length", LongType(), True))
    return schema.add(StructField("modificationTime", TimestampType(), True))


def _glob_escape(path: str) -> str:
    """``path`` with Hadoop glob characters escaped, to open it by name."""
    return "".join("\\" + c if c in _GLOB_CHARS else c for c in path)


class FeaturesTable:
    """The ``FEATURES`` folder seen through its run manifest.

    Parameters
    ----------
    spark : SparkSession
    uri : str
        The features folder (local path or Hadoop URI).
    """

    def __init__(self, spark, uri: str):
        self.spark = spark
        self.uri = uri.rstrip("/")

    # ---------------------------------------------------------------- layout

    def run_uri(self, run: str) -> str:
        """Where run ``run``'s rows live once committed."""
        return f"{self.uri}/{RUN_PREFIX}{run}"

    def staging_uri(self, run: str) -> str:
        """Where run ``run``'s rows are written before the commit."""
        return f"{self.uri}/{STAGING_DIR}/{RUN_PREFIX}{run}"

    def record_uri(self, run: str) -> str:
        """The manifest record of run ``run``."""
        return f"{self.uri}/{RUNS_DIR}/{run}.json"

    def records(self) -> List[Dict[str, Any]]:
        """The committed runs' records, oldest first."""
        out = []
        for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, f"{self.uri}/{RUNS_DIR}"):
            if not is_dir and name.endswith(".json") and not name.startswith("."):
                text = hadoopfs.read_text(self.spark, f"{self.uri}/{RUNS_DIR}/{name}")
                out.append(json.loads(text))
        return sorted(out, key=lambda r: r["run"])

    def live_runs(self, records: Optional[List[Dict[str, Any]]] = None) -> List[str]:
        """Runs whose rows are part of the table: committed and not superseded."""
        records = self.records() if records is None else records
        gone = {r for rec in records for r in rec.get("removes", [])}
        return [rec["run"] for rec in records if rec["run"] not in gone]

    def flat_files(self) -> List[str]:
        """Parquet files directly in the folder (a table made by a plain ``featurize``)."""
        return [
            f"{self.uri}/{name}"
            for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, self.uri)
            if not is_dir and name.endswith(".parquet") and not name.startswith(("_", "."))
        ]

    def data_files(self) -> List[str]:
        """Every Parquet file of the table (flat or in live run folders)."""
        return [u for u, _ in hadoopfs.list_files(self.spark, self.uri, ".parquet")]

    def model(self) -> Optional[Dict[str, Any]]:
        """What made the table's features: the last run's record, else a file footer."""
        for rec in reversed(self.records()):
            if rec.get("model"):
                return rec["model"]
        files = self.data_files()
        if not files:
            return None
        from stages.contract import footer_model_spec

        return footer_model_spec(hadoopfs.parquet_footer(self.spark, files[0]))

    # ---------------------------------------------------------------- commit

    def commit(self, record: Dict[str, Any]) -> None:
        """Steps 2 and 3 of the protocol for a run whose rows are in staging."""
        hadoopfs.write_text_atomic(
            self.spark, self.record_uri(record["run"]), json.dumps(record, indent=2)
        )
        self._finish(record)

    def _finish(self, record: Dict[str, Any]) -> None:
        run = record["run"]
        if record.get("kind") == "migrate":
            for name in record["files"]:
                if hadoopfs.exists(self.spark, f"{self.uri}/{name}"):
                    hadoopfs.rename(self.spark, f"{self.uri}/{name}", f"{self.run_uri(run)}/{name}")
        staged = self.staging_uri(run)
        if hadoopfs.exists(self.spark, staged):
            final = self.run_uri(run)
            if not hadoopfs.exists(self.spark, final):
                if not hadoopfs.rename(self.spark, staged, final):
                    raise OSError(f"could not rename {staged} to {final}")
            else:  # an S3 rename that died half-way: move what is left, file by file
                for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, staged):
                    if not is_dir and not hadoopfs.exists(self.spark, f"{final}/{name}"):
                        hadoopfs.rename(self.spark, f"{staged}/{name}", f"{final}/{name}")
                hadoopfs.delete(self.spark, staged)
        for old in record.get("removes", []):
            if hadoopfs.delete(self.spark, self.run_uri(old)):
                logger.info(f"featurize: run {old} superseded by {run}: its folder is deleted")
        staging = f"{self.uri}/{STAGING_DIR}"
        if hadoopfs.exists(self.spark, staging) and not hadoopfs.list_dir(self.spark, staging):
            hadoopfs.delete(self.spark, staging)

    def recover(self) -> None:
        """Roll committed runs forward and drop aborted ones (idempotent, cheap)."""
        records = self.records()
        committed = {r["run"] for r in records}
        for rec in records:
            pending = hadoopfs.exists(self.spark, self.staging_uri(rec["run"])) or any(
                hadoopfs.exists(self.spark, self.run_uri(o)) for o in rec.get("removes", [])
            )
            if rec.get("kind") == "migrate":
                pending = any(hadoopfs.exists(self.spark, f"{self.uri}/{n}") for n in rec["files"])
            if pending:
                logger.info(
                    f"featurize: finishing the commit of run {rec['run']} (a run died after it)"
                )
                self._finish(rec)
        for name, _dir, _, _ in hadoopfs.list_dir(self.spark, f"{self.uri}/{RUNS_DIR}"):
            if name.startswith(".") and name.endswith(".tmp"):  # a record never renamed in
                hadoopfs.delete(self.spark, f"{self.uri}/{RUNS_DIR}/{name}")
        for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, f"{self.uri}/{STAGING_DIR}"):
            run = name[len(RUN_PREFIX) :] if name.startswith(RUN_PREFIX) else None
            if is_dir and run not in committed:
                logger.info(
                    f"featurize: deleting {STAGING_DIR}/{name}, left by a run that did not commit"
                )
                hadoopfs.delete(self.spark, f"{self.uri}/{STAGING_DIR}/{name}")

    def migrate_flat(self) -> Optional[str]:
        """Move a plain ``featurize`` output's files into a first run (no rewrite).

        The record, listing the files, is written first: a move that dies half-way
        is finished by :meth:`recover`.  Its rows have no ``length`` and
        ``modificationTime``: an image counts as changed when it is newer than
        those files.
        """
        files = self.flat_files()
        if not files:
            return None
        run = new_run_id()
        stamps = {n: m for n, d, _, m in hadoopfs.list_dir(self.spark, self.uri) if not d}
        names = [u.rsplit("/", 1)[1] for u in files]
        record = {
            "run": run,
            "kind": "migrate",
            "started": now_iso(),
            "committed": now_iso(),
            "rows": int(self.spark.read.parquet(*files).count()),
            "files": names,
            "written_ms": max(stamps.get(n, 0) for n in names),
            "model": self.model(),
            "removes": [],
        }
        self.commit(record)
        hadoopfs.delete(self.spark, f"{self.uri}/_SUCCESS")
        logger.info(f"featurize: {len(files)} files of a plain featurize moved into run {run}")
        return run

    # ---------------------------------------------------------------- reading

    def read_runs(self, runs: List[str], spec=None):
        """The rows of ``runs`` with the incremental schema and a ``run`` column."""
        from pyspark.sql import functions as F

        if not runs:
            return self.spark.createDataFrame([], incremental_schema(spec)).withColumn(
                "run", F.lit(None).cast("string")
            )
        df = (
            self.spark.read.schema(incremental_schema(spec))
            .option("basePath", self.uri)
            .parquet(*[self.run_uri(r) for r in runs])
        )
        if "run" not in df.columns:  # only when Spark did not discover the partition column
            df = df.withColumn("run", F.regexp_extract(F.input_file_name(), r"run=([^/]+)/", 1))
        return df


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


def check_same_model(table_model: Optional[Dict[str, Any]], spec, where: str) -> None:
    """Refuse to add features of another model to a table (one line, exit 2)."""
    from stages.contract import model_identity

    if table_model is None:
        raise UsageError(f"{where} records no model: featurize everything again into a new folder")
    if model_identity(table_model) != model_identity(spec.to_dict()):
        raise UsageError(
            f"{where} was made by {table_model.get('name')} {_made_by(table_model)}, not by "
            f"{_made_by(spec.to_dict())}: give the same --weights/--alpha and decode options, "
            "or a new FEATURES folder"
        )


def _made_by(model: Dict[str, Any]) -> str:
    """The options that made features, as the user gave them."""
    words = [f"alpha={model.get('alpha')} {model.get('weights_source')}"]
    if not model.get("exif_orientation", False):  # older features: pixels as stored
        words.append("--ignore-exif-orientation")
    if int(model.get("jpeg_draft", 0)):
        words.append(f"--jpeg-draft {model['jpeg_draft']}")
    return " ".join(words)


def _input_exists(spark, uri: str) -> bool:
    """Whether ``uri`` exists, or, for a Hadoop glob (``Test/2026/12/{01,02}/``),
    matches something."""
    if not any(c in uri for c in "{}[]*?"):
        return hadoopfs.exists(spark, uri)
    if hadoopfs.bucket_missing(spark, uri):
        return False
    return hadoopfs.glob_matches(spark, uri) > 0


def _qualified_prefix(spark, uri: str) -> str:
    return hadoopfs.qualified(spark, uri).rstrip("/") + "/"


def featurize_incremental(
    spark,
    input_path: str,
    output_path: str,
    params: Optional[FeaturizeParams] = None,
    **options: Any,
) -> IncrementalReport:
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
        As :func:`stages.featurize.featurize` (``incremental`` is implied; ``prune``
        also drops the rows of images no longer under ``input_path``).
    **options
        Fields of :class:`~stages.params.FeaturizeParams` given one by one.

    Returns
    -------
    IncrementalReport

    Raises
    ------
    UsageError
        Missing input, features of another model, a glob input with ``prune``.
    """
    from pyspark.sql import functions as F

    from stages.featurize import (
        NO_DICTIONARY,
        choose_partitions,
        empty_file_rows,
        featurize_frame,
        paths_are_url_encoded,
        prepare_features_model,
        read_images,
    )
    from stages.sparkutil import session_conf

    # Incremental by definition (so `overwrite` is refused, `prune` allowed).
    params = FeaturizeParams.of(params, **{**options, "incremental": True})
    prune, partitions = params.prune, params.partitions
    if prune and any(c in input_path for c in "{}[]*?"):
        raise UsageError(
            f"--prune needs a plain INPUT folder, not the glob {input_path}: "
            "it drops the rows of images no longer under it"
        )
    t0 = time.perf_counter()
    if not _input_exists(spark, input_path):
        raise UsageError(f"input {input_path} does not exist: give a folder of <Class>/<image>.jpg")
    if hadoopfs.bucket_missing(spark, output_path):
        raise UsageError(f"the bucket of output {output_path} does not exist: create it first")
    table = FeaturesTable(spark, output_path)
    spec, weight_arrays, batch_size = prepare_features_model(params)
    fresh = not hadoopfs.has_data(spark, output_path)
    if not fresh:
        table.recover()
        fresh = not table.records() and not table.flat_files()
        if not fresh:
            check_same_model(table.model(), spec, f"features {output_path}")
        if table.flat_files():
            table.migrate_flat()
    records = table.records()
    live = table.live_runs(records)
    written_ms = {r["run"]: r.get("written_ms") for r in records}

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
    written = (
        F.create_map(
            *[x for r, ms in written_ms.items() if ms is not None for x in (F.lit(r), F.lit(ms))]
        )
        if any(ms is not None for ms in written_ms.values())
        else None
    )
    mtime_ms = (F.unix_micros(F.col("modificationTime")) / 1000).cast("long")
    legacy_changed = (
        F.col("old_length").isNull() & (mtime_ms > F.coalesce(written[F.col("run")], F.lit(0)))
        if written is not None
        else F.lit(False)
    )
    changed_cond = (
        F.col("length").isNotNull()
        & F.col("run").isNotNull()
        & (
            (
                F.col("old_length").isNotNull()
                & (
                    (F.col("length") != F.col("old_length"))
                    | ~F.col("modificationTime").eqNullSafe(F.col("old_mtime"))
                )
            )
            | legacy_changed
        )
    )
    status = (
        F.when(F.col("run").isNull(), F.lit("new"))
        .when(F.col("length").isNull(), F.lit("gone"))
        .when(changed_cond, F.lit("changed"))
        .otherwise(F.lit("same"))
    )
    prefix = _qualified_prefix(spark, input_path) if prune else None

    def make_plan(listing):
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

    plan, summary = make_plan(meta)
    try:
        n_scanned = sum(int(r["count"]) for r in summary if r["status"] not in ("gone", "pruned"))
        pct = max((r["pct"] for r in summary if r["pct"]), default=None)
        url_encoded = paths_are_url_encoded(spark, pct)
        empties = None
        if n_listed > n_scanned:  # zero-byte files: the scan drops them, the index lists them
            empties = empty_file_rows(spark, images, listed_files, url_encoded, spec)
            plan.unpersist()
            plan, summary = make_plan(
                meta.unionByName(
                    empties.select(
                        "path",
                        F.lit(0).cast("long").alias("length"),
                        F.lit(None).cast("timestamp").alias("modificationTime"),
                    )
                )
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
                input_path, output_path, None, n_listed, 0, 0, 0, 0, 0, 0, seconds
            )
        superseded = sorted({r["run"] for r in summary if r["status"] in ("changed", "pruned")})
        todo = plan.where(F.col("status").isin("new", "changed")).select(
            "path", "length", "modificationTime"
        )
        run = new_run_id()
        started = now_iso()
        scan = "none"
        parts = []
        frame = None
        if n_read > 0:
            to_read = todo.where(F.col("length") > 0)
            if n_read > _SCAN_ALL_SHARE * max(1, n_scanned):
                scan = "all"
                source = images.join(F.broadcast(to_read.select("path")), "path", "left_semi")
            else:
                scan = "by-name"
                names = [_glob_escape(r[0]) for r in to_read.select("path").collect()]
                # Spark lists many named files with one task per file: a few tasks do.
                tasks = str(max(2, 2 * spark.sparkContext.defaultParallelism))
                with session_conf(
                    spark, {"spark.sql.sources.parallelPartitionDiscovery.parallelism": tasks}
                ):
                    source = spark.read.format("binaryFile").load(names)
            n_parts = choose_partitions(n_read, spark.sparkContext.defaultParallelism, partitions)
            frame = featurize_frame(
                spark,
                source,
                spec,
                weight_arrays,
                batch_size,
                url_encoded,
                partitions=n_parts,
            )
            parts.append(frame.df.join(F.broadcast(todo), "path"))
        if empties is not None and n_empty_todo:
            parts.append(empties.join(F.broadcast(todo.where(F.col("length") == 0)), "path"))
        carried = 0
        if superseded:
            dropped = plan.where(F.col("status").isin("changed", "pruned")).select("path")
            carried_df = table.read_runs(superseded, spec).join(dropped, "path", "left_anti")
            carried = carried_df.count()
            parts.append(carried_df.drop("run"))
        out = parts[0]
        for p in parts[1:]:
            out = out.unionByName(p)
        schema = incremental_schema(spec)
        out = out.select(*[F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema])
        staged = table.staging_uri(run)
        logger.info(f"featurize: run {run}: featurizing {todo_n} images ({scan} scan)")
        with session_conf(spark, frame.settings if frame is not None else {}):
            out.write.mode("errorifexists").options(**NO_DICTIONARY).parquet(staged)
        images_done = (frame.images if frame is not None else 0) + n_empty_todo
        errors = (frame.errors if frame is not None else 0) + n_empty_todo
        written_rows = images_done + carried
        if frame is not None:
            frame.release()
        record = {
            "run": run,
            "kind": "featurize",
            "input": input_path,
            "started": started,
            "committed": now_iso(),
            "rows": int(written_rows),
            "new": n_new,
            "changed": n_changed,
            "pruned": n_pruned,
            "carried": int(carried),
            "errors": int(errors),
            "model": spec.to_dict(),
            "removes": superseded,
        }
        table.commit(record)
    finally:
        planning.close()
        plan.unpersist()
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
    )
    logger.info(
        f"featurize: committed run {run}: {report.images} images featurized "
        f"({report.errors} errors), {report.pruned} pruned, {report.carried} rows carried over, "
        f"in {seconds:.1f} s"
    )
    return report
