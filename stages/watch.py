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

``--available-now`` processes what is there and stops (a cron job or an EMR
step); ``--trigger 10s`` keeps going.  With ``--results``, each committed run is
also projected with the saved PCA model into
``RESULTS/projections/watch-<run>.parquet`` (one file, renamed into place).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Dict, Optional

from stages.base.contract import IMAGE_GLOB, model_identity
from stages.base.errors import UsageError
from stages.base.params import WatchParams
from stages.featurize.frame import (
    choose_partitions,
    featurize_frame,
    paths_are_url_encoded,
    prepare_features_model,
    require_input,
    write_features,
)
from stages.reduce.pca_model import PCAModel
from stages.reduce.update import project_pending, project_run
from stages.storage import hadoopfs
from stages.storage.layout import Results
from stages.storage.table import (
    FeaturesTable,
    RunRecord,
    incremental_schema,
    new_run_id,
    now_iso,
)

logger = logging.getLogger(__name__)

__all__ = ["WatchParams", "watch"]


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
        self.known = None  # DataFrame of the paths in the table at start (cached)
        self.totals = {"batches": 0, "images": 0, "errors": 0, "runs": [], "skipped_batches": 0}

    def __call__(self, batch_df, batch_id: int) -> None:
        from pyspark.sql import functions as F

        self.started.wait()  # the query id is known once start() has returned
        t0 = time.time()
        if batch_id in self.done:
            self.totals["skipped_batches"] += 1
            logger.info(f"watch: batch {batch_id} was committed before a restart: skipped")
            return
        table = self.table
        spark = self.spark
        meta = batch_df.select("path", "length", "modificationTime").collect()
        paths = spark.createDataFrame([(r[0],) for r in meta], "path string")
        # Paths the table held when the query started (read once), plus the ones this
        # query committed since: one writer at a time, so nothing else adds any.
        known = {r[0] for r in self.known.join(F.broadcast(paths), "path", "left_semi").collect()}
        todo_rows = [r for r in meta if r[0] not in known and r[0] not in self.committed]
        self.totals["batches"] += 1
        if not todo_rows:
            logger.info(f"watch: batch {batch_id}: 0 new images")
            return
        run = new_run_id()
        started = now_iso()
        todo = spark.createDataFrame(
            todo_rows, "path string, length long, modificationTime timestamp"
        )
        pct = next((r[0] for r in todo_rows if "%" in r[0]), None)
        n = len(todo_rows)
        n_parts = choose_partitions(n, spark.sparkContext.defaultParallelism, self.opts.partitions)
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
        )
        schema = incremental_schema(self.spec)
        out = frame.df.join(F.broadcast(todo), "path").select(
            *[F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema]
        )
        write_features(spark, out, table.staging_uri(run), frame.settings)
        record = RunRecord(
            run=run,
            kind="watch",
            input=self.input,
            query=self.query_id,
            batch=int(batch_id),
            started=started,
            rows=frame.images,
            new=frame.images,
            errors=frame.errors,
            model=self.spec.to_dict(),
        )
        table.commit(record)
        self.done.add(batch_id)
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
            f"watch: batch {batch_id}: {frame.images} new images ({frame.errors} errors) "
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
    require_input(spark, input_path)
    spec, weights, batch_size = prepare_features_model(opts)
    opts = dataclasses.replace(opts, batch_size=batch_size)
    table = FeaturesTable(spark, features).open_for_append(spec)
    model = None
    if opts.results:
        if not hadoopfs.exists(spark, Results(opts.results).model):
            raise UsageError(
                f"--results {opts.results} holds no pca_model: run `fruits-pipeline reduce` first"
            )
        model = PCAModel.load(opts.results, spark)
        if model_identity(model.features_model) != model_identity(spec.to_dict()):
            raise UsageError(
                f"the PCA model in {opts.results} was fitted on features of another model "
                f"({model.features_model.get('weights_source')}): give the same --weights"
            )

        project_pending(spark, table, model, opts.results)
    checkpoint = opts.checkpoint or table.uri + "/_watch_checkpoint"

    sink = _Sink(spark, input_path, table, spec, weights, opts, model)
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
    query = writer.start()
    sink.query_id = str(query.id)
    sink.done = {
        int(r["batch"])
        for r in table.records()
        if r.get("kind") == "watch" and r.get("query") == sink.query_id
    }
    sink.known = table.read_runs(table.live_runs(), spec).select("path").cache()
    sink.started.set()
    mode = "available-now" if opts.available_now else f"every {opts.trigger_seconds:g} s"
    logger.info(
        f"watch: query {sink.query_id} on {input_path} -> {features} ({mode}), {checkpoint}"
    )
    try:
        if opts.stop_after is not None:
            query.awaitTermination(opts.stop_after)
        else:
            query.awaitTermination()
    except KeyboardInterrupt:
        logger.info("watch: interrupted: stopping the query (the checkpoint keeps its place)")
    finally:
        query.stop()
        sink.bc.unpersist()
        sink.known.unpersist()
    return {
        "query": sink.query_id,
        "checkpoint": checkpoint,
        **{k: v for k, v in sink.totals.items()},
    }
