"""``fruits-pipeline watch``: featurize images as they land, with Structured Streaming.

Spark's ``binaryFile`` streaming source lists INPUT at every trigger and hands
each micro-batch (the files not seen before, tracked in the checkpoint) to
``foreachBatch``, which runs the featurize code path
(:func:`stages.featurize.frame.featurize_frame`: same broadcast weights, same model
cache, same error rows) and commits the rows as one run of the features table
(:mod:`stages.featurize.incremental`).  Exactly once across restarts:

* Spark writes a batch's file list to the checkpoint before running it and
  replays the same batch (same id, same files) after a crash;
* each committed run's record names the query and the batch, so a replayed
  batch that had already committed is skipped, and one that had not finds its
  aborted staging folder deleted and runs again;
* paths already in the table (from ``featurize --incremental``) are skipped.

On S3 without a queue, each trigger is a ``featurize --incremental`` run instead
of a micro-batch of Spark's file stream (:func:`stages.watch_listing.watch_by_listing` says why).

A photo modified less than :data:`SETTLE_SECONDS` ago may still be being written: it
is set aside (in the checkpoint's ``fruits_pending.json``, as the source never offers
it again) and featurized once it has not changed for that long, at a later batch or
trigger, or before ``--available-now`` ends.  Ctrl-C (SIGINT) and SIGTERM stop the
query once the batch being featurized has committed (on S3, the run in progress), print
one line and exit 130 or 143 (:mod:`stages.featurize.stopping`).  Another writer on the
table (``featurize --incremental``) is seen at the next batch; a commit of the same
photos at the same time refuses this one (:meth:`stages.storage.table.FeaturesTable.commit`).

``--available-now`` processes what is there and stops (a cron job or an EMR
step); ``--trigger 10s`` keeps going.  ``--queue URL`` takes the new photos from an
SQS queue of the bucket's S3 notifications instead of listing INPUT
(:mod:`stages.featurize.queue`).  With ``--results``, each committed run is
also projected with the saved PCA model into
``RESULTS/projections/watch-<run>.parquet`` (one file, renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any, Dict, Optional

from stages.base.contract import IMAGE_GLOB, model_identity
from stages.base.errors import UsageError
from stages.base.params import WatchParams
from stages.featurize.frame import (
    choose_partitions,
    escape_glob,
    featurize_frame,
    paths_are_url_encoded,
    prepare_features_model,
    require_input,
    write_features,
)
from stages.featurize.queue import check_queue_input, watch_queue
from stages.featurize.stopping import await_query
from stages.reduce.pca_model import PCAModel
from stages.reduce.update import project_pending, project_run
from stages.storage import hadoopfs
from stages.storage.fetch import is_object_store, reader_settings
from stages.storage.layout import Results
from stages.storage.table import (
    FeaturesTable,
    RunRecord,
    incremental_schema,
    new_run_id,
    now_iso,
)
from stages.watch_listing import watch_by_listing

logger = logging.getLogger(__name__)

__all__ = ["WatchParams", "watch", "SETTLE_SECONDS"]

# A file modified less than this long ago may still be being written (a slow copy,
# an upload): it waits until it has been still for that long.
SETTLE_SECONDS = 10.0
PENDING_FILE = "fruits_pending.json"


class _Stopping(RuntimeError):
    """Raised in a batch that starts while watch stops: Spark keeps it for the next start."""


class _Sink:
    """The ``foreachBatch`` function: one committed run per non-empty micro-batch."""

    def __init__(self, spark, input_path, table, spec, weights, opts: WatchParams, model):
        self.spark = spark
        self.input = input_path
        self.table = table
        self.spec = spec
        self.opts = opts
        self.model = model
        self.bc = spark.sparkContext.broadcast(weights)
        self.weights = weights
        self.query_id: Optional[str] = None
        self.started = threading.Event()
        self.done: set = set()
        self.committed: set = set()
        self.known = None  # DataFrame of the paths in the table (cached; see _refresh)
        self.base = 0  # the table's head when `known` was read, then after each commit
        self.lock = threading.Lock()  # held while a batch runs
        self.stopping = threading.Event()
        self.failure: Optional[BaseException] = None
        self.pending: Dict[str, None] = {}  # paths set aside until they settle
        self.pending_uri: Optional[str] = None
        self.fetch = reader_settings(spark, input_path)
        self.totals = {"batches": 0, "images": 0, "errors": 0, "runs": [], "skipped_batches": 0}

    def __call__(self, batch_df, batch_id: int) -> None:
        self.started.wait()  # the query id is known once start() has returned
        if self.stopping.is_set():
            raise _Stopping(f"watch is stopping: batch {batch_id} is left for the next start")
        with self.lock:
            try:
                self._batch(batch_df, batch_id)
            except UsageError as exc:  # watch() raises it once the query has stopped
                self.failure = exc
                raise

    def refresh(self) -> None:
        """Read the table's paths again if another writer committed since (one LIST)."""
        head = self.table.head()
        if self.known is None or head > self.base:
            if self.known is not None:
                self.known.unpersist()
            live = self.table.live_runs()
            self.known = self.table.read_runs(live, self.spec).select("path").cache()
            self.base = head

    def _new(self, meta) -> list:
        """The rows of ``meta`` whose path is in neither the table nor this query's runs."""
        from pyspark.sql import functions as F

        self.refresh()
        paths = self.spark.createDataFrame([(r[0],) for r in meta], "path string")
        known = {r[0] for r in self.known.join(F.broadcast(paths), "path", "left_semi").collect()}
        return [r for r in meta if r[0] not in known and r[0] not in self.committed]

    def _save_pending(self) -> None:
        hadoopfs.write_text(self.spark, self.pending_uri, json.dumps(sorted(self.pending)))

    def load_pending(self) -> None:
        if hadoopfs.exists(self.spark, self.pending_uri):
            text = hadoopfs.read_text(self.spark, self.pending_uri)
            self.pending = dict.fromkeys(json.loads(text))

    def _batch(self, batch_df, batch_id: int) -> None:
        t0 = time.time()
        if batch_id in self.done:
            self.totals["skipped_batches"] += 1
            logger.info(f"watch: batch {batch_id} was committed before a restart: skipped")
            return
        meta = batch_df.select("path", "length", "modificationTime").collect()
        todo_rows = self._new(meta)
        self.totals["batches"] += 1
        young = [
            r[0] for r in todo_rows if r[2] is not None and t0 - r[2].timestamp() < SETTLE_SECONDS
        ]
        if young:  # saved before the batch ends: Spark will not offer these files again
            self.pending.update(dict.fromkeys(young))
            self._save_pending()
            logger.info(f"watch: batch {batch_id}: {len(young)} images still being written")
            todo_rows = [r for r in todo_rows if r[0] not in self.pending]
        if not todo_rows:
            logger.info(f"watch: batch {batch_id}: 0 new images")
        else:
            self._commit(batch_df, todo_rows, t0, batch=batch_id)
        self.flush_pending(wait=False)

    def flush_pending(self, wait: bool) -> None:
        """Featurize the set-aside files that have settled (``wait``: wait for them all,
        up to a few settle times; what still changes stays for the next start)."""
        deadline = time.time() + 6 * SETTLE_SECONDS
        while self.pending:
            gone = [p for p in self.pending if not hadoopfs.exists(self.spark, p)]
            names = [escape_glob(p) for p in self.pending if p not in gone]
            source = self.spark.read.format("binaryFile").load(names) if names else None
            meta = source.select("path", "length", "modificationTime").collect() if names else []
            now = time.time()
            settled = [r for r in meta if now - r[2].timestamp() >= SETTLE_SECONDS]
            todo_rows = self._new(settled) if settled else []
            if todo_rows:
                self._commit(source, todo_rows, now, batch=None)
            for p in gone + [r[0] for r in settled]:
                self.pending.pop(p, None)
            if gone or settled:
                self._save_pending()
            if not self.pending or not wait or time.time() > deadline:
                return
            youngest = max(r[2].timestamp() for r in meta if r[0] in self.pending)
            time.sleep(max(0.2, youngest + SETTLE_SECONDS - time.time()))

    def _commit(self, batch_df, todo_rows: list, t0: float, batch: Optional[int]) -> None:
        from pyspark.sql import functions as F

        spark, table = self.spark, self.table
        run = new_run_id()
        started = now_iso()
        todo = spark.createDataFrame(
            todo_rows, "path string, length long, modificationTime timestamp"
        )
        pct = next((r[0] for r in todo_rows if "%" in r[0]), None)
        n = len(todo_rows)
        n_parts = choose_partitions(n, spark.sparkContext.defaultParallelism, self.opts.partitions)
        if self.fetch is not None:  # the workers read each new photo once, by name
            source = todo.select("path").repartition(n_parts)
        else:
            source = batch_df.join(F.broadcast(todo.select("path")), "path", "left_semi")
        frame = featurize_frame(
            spark,
            source,
            self.spec,
            self.weights,
            self.opts.batch_size,
            paths_are_url_encoded(spark, pct),
            partitions=n_parts,
            broadcast=self.bc,
            fetch=self.fetch,
        )
        schema = incremental_schema(self.spec)
        out = frame.df.join(F.broadcast(todo), "path").select(
            *[F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema]
        )
        write_features(spark, out, table.staging_uri(run), frame.settings)
        record = RunRecord(
            run=run,
            # a run of set-aside files is not a batch: a restart never skips it
            kind="watch" if batch is not None else "watch-settled",
            input=self.input,
            query=self.query_id,
            batch=batch,
            started=started,
            rows=frame.images,
            new=frame.images,
            errors=frame.errors,
            model=self.spec.to_dict(),
        )
        self.base = table.commit(record, self.base)
        if batch is not None:
            self.done.add(batch)
        self.committed.update(r[0] for r in todo_rows)
        t1 = time.time()
        oldest = min(r[2].timestamp() for r in todo_rows if r[2] is not None)
        self.totals["images"] += frame.images
        self.totals["errors"] += frame.errors
        self.totals["runs"].append(run)
        projected = ""
        if self.model is not None:
            rows = project_run(spark, table, run, self.model, self.opts.results)
            projected = f", {rows} projected"
        logger.info(
            f"watch: {'settled files' if batch is None else f'batch {batch}'}: "
            f"{frame.images} new images ({frame.errors} errors) "
            f"in run {run}, {frame.images / max(t1 - t0, 1e-9):.1f} img/s, "
            f"lag {t1 - oldest:.1f} s from the oldest file landing{projected}"
        )


def watch(
    spark,
    input_path: str,
    features: str,
    params: Optional[WatchParams] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Run the streaming query until it stops (``available_now``, ``stop_after``, Ctrl-C).

    Parameters
    ----------
    spark : SparkSession
    input_path : str
        Folder or URI of ``<Class>/<image>.jpg`` files, watched for new ones.
    features : str
        The features table (:mod:`stages.featurize.incremental` layout).
    params : WatchParams, optional
        The options of ``fruits-pipeline watch`` (the featurize options, trigger,
        checkpoint, ``results`` ...): :class:`stages.base.params.WatchParams`.
    **options
        Fields of :class:`~stages.base.params.WatchParams` given one by one.

    Returns
    -------
    dict
        Batches, images, errors, the runs committed.

    Raises
    ------
    UsageError
        Missing input, features or PCA model of another model.
    """

    opts = WatchParams.of(params, **options)
    _require_input(spark, input_path, opts.queue)
    spec, weights, batch_size = prepare_features_model(opts)
    opts = dataclasses.replace(opts, batch_size=batch_size)
    table = FeaturesTable(spark, features).open_for_append(spec)
    model = _saved_model(spark, opts.results, spec) if opts.results else None
    if model is not None:
        project_pending(spark, table, model, opts.results)
    if opts.queue:
        # New photos from the bucket's notifications: no listing, no checkpoint (the
        # queue keeps what is not yet committed, the table what is).
        def project(run: str) -> None:
            rows = project_run(spark, table, run, model, opts.results)
            logger.info(f"watch: run {run}: {rows} projected")

        return watch_queue(spark, input_path, features, opts, project if model else None)
    if is_object_store(input_path):
        return watch_by_listing(spark, input_path, features, opts, model)
    checkpoint = opts.checkpoint or table.uri + "/_watch_checkpoint"
    sink = _Sink(spark, input_path, table, spec, weights, opts, model)
    sink.pending_uri = checkpoint.rstrip("/") + "/" + PENDING_FILE
    query = _start_stream(spark, input_path, sink, opts, checkpoint)
    sink.query_id = str(query.id)
    sink.done = {
        int(r["batch"])
        for r in table.records()
        if r.get("kind") == "watch" and r.get("query") == sink.query_id
    }
    sink.refresh()
    sink.load_pending()
    sink.started.set()
    mode = "available-now" if opts.available_now else f"every {opts.trigger_seconds:g} s"
    logger.info(
        f"watch: query {sink.query_id} on {input_path} -> {features} ({mode}), {checkpoint}"
    )
    try:
        stopped = await_query(query, sink, opts.stop_after, opts.available_now)
    except Exception:
        if sink.failure is not None:  # ours, raised in a batch: not Spark's wrapping of it
            raise sink.failure from None
        raise
    finally:
        query.stop()
        sink.bc.unpersist()
        if sink.known is not None:
            sink.known.unpersist()
    return {
        "query": sink.query_id,
        "checkpoint": checkpoint,
        "stopped": stopped,
        "pending": len(sink.pending),
        **{k: v for k, v in sink.totals.items()},
    }


def _require_input(spark, input_path: str, queue: Optional[str]) -> None:
    if queue:
        check_queue_input(input_path)
        # The queue announces what lands under INPUT: it may hold nothing yet.
        if hadoopfs.bucket_missing(spark, input_path):
            raise UsageError(f"the bucket of input {input_path} does not exist")
    else:
        require_input(spark, input_path)


def _saved_model(spark, results: str, spec) -> PCAModel:
    """The PCA model of ``--results``, checked to be fitted on features of ``spec``."""
    if not hadoopfs.exists(spark, Results(results).model):
        raise UsageError(
            f"--results {results} holds no pca_model: run `fruits-pipeline reduce` first"
        )
    model = PCAModel.load(results, spark)
    if model_identity(model.features_model) != model_identity(spec.to_dict()):
        raise UsageError(
            f"the PCA model in {results} was fitted on features of another model "
            f"({model.features_model.get('weights_source')}): give the same --weights"
        )
    return model


def _start_stream(spark, input_path: str, sink, opts: WatchParams, checkpoint: str):
    """Spark's ``binaryFile`` file stream over ``input_path`` into ``sink``, started."""
    schema = "path string, modificationTime timestamp, length long, content binary"
    reader = (
        spark.readStream.format("binaryFile")
        .schema(schema)
        .option("pathGlobFilter", IMAGE_GLOB)
        .option("recursiveFileLookup", "true")
    )
    if opts.max_files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", opts.max_files_per_trigger)
    writer = reader.load(input_path).writeStream.foreachBatch(sink)
    writer = writer.option("checkpointLocation", checkpoint).queryName("fruits-pipeline-watch")
    if opts.available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{opts.trigger_seconds} seconds")
    return writer.start()
