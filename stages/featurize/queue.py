"""New photos from an SQS queue of S3 notifications: ``--queue URL``.

``featurize --incremental --queue URL`` featurizes the photos announced on the queue
(the bucket's ``ObjectCreated`` notifications, :mod:`stages.storage.s3events`) and
commits them as one run of the features table; ``watch --queue URL`` does that in a
loop, waiting on the queue (long polling) between runs.  No listing: a run's cost
follows what is new, whatever the bucket holds.

Exactly once, from at-least-once delivery:

* a message is deleted only after the run holding its photo has committed: a run
  that dies before leaves its messages to come back (after the queue's visibility
  timeout) and be featurized again;
* a photo already in the table (a message delivered twice, or a restart after the
  commit but before the delete) is skipped, and its message deleted.

What a queue cannot promise, a listing can: S3 does not guarantee every event, and
a photo replaced under the same name is skipped here (its path is in the table).  A
full ``featurize --incremental`` now and then (the reconciliation) featurizes what
was missed and what changed; rows written from the queue record the object's size
and no time, and count as unchanged when the listed object has that size and is
older than their run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from stages.base.contract import IMAGE_NAME
from stages.base.errors import UsageError
from stages.featurize.frame import (
    RunReport,
    choose_partitions,
    featurize_frame,
    prepare_features_model,
    write_features,
)
from stages.featurize.stopping import StopSignals
from stages.storage.fetch import is_object_store, requests_made, split_s3, store_settings
from stages.storage.s3events import EventQueue
from stages.storage.s3list import delta
from stages.storage.table import (
    FeaturesTable,
    RunRecord,
    incremental_schema,
    new_run_id,
    now_iso,
)

logger = logging.getLogger(__name__)

__all__ = ["QueueReport", "QueueRun", "featurize_from_queue"]

# Photos a run takes from the queue at most: bounded runs keep the lag from landing to
# row short and bound what the driver holds (the batch's paths).
DEFAULT_LIMIT = 10_000


@dataclass
class QueueReport(RunReport):
    """What one run over the queue did."""

    input: str
    output: str
    queue: str
    run: Optional[str]
    messages: int
    test_events: int
    events: int
    outside_input: int
    already_featurized: int
    images: int
    errors: int
    seconds: float
    requests: Dict[str, int] = field(default_factory=dict)


def _in_input(input_path: str) -> Tuple[str, str, str]:
    scheme, bucket, prefix = split_s3(input_path)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return scheme, bucket, prefix


def check_queue_input(input_path: str) -> None:
    """``--queue`` reads S3 notifications: the INPUT must be an S3 prefix, no glob."""
    if not is_object_store(input_path):
        raise UsageError(
            f"--queue reads S3 notifications: INPUT must be s3:// or s3a://, not {input_path}"
        )
    if any(c in input_path for c in "{}[]*?"):
        raise UsageError(f"--queue needs a plain INPUT prefix, not the glob {input_path}")


class QueueRun:
    """The state a series of runs over one queue shares (``watch --queue`` keeps one):
    the queue client, the model's broadcast, the table."""

    def __init__(self, spark, input_path, output_path, params, queue_url, visibility=None):
        check_queue_input(input_path)
        self.spark = spark
        self.input = input_path
        self.output = output_path
        self.params = params
        self.settings = store_settings(spark)
        self.queue = EventQueue(queue_url, self.settings, visibility)
        self.scheme, self.bucket, self.prefix = _in_input(input_path)
        self.spec, payload, self.batch_size = prepare_features_model(params)
        self.table = FeaturesTable(spark, output_path).open_for_append(self.spec)
        self.payload = payload
        self.bc = spark.sparkContext.broadcast(payload)
        # The table's paths, read once (a Parquet column, no request per photo), plus
        # what this process commits: a run joins its few candidates with them.
        self.known = self.table.read_runs(self.table.live_runs(), self.spec).select("path")
        self.known = self.known.cache()
        self.committed: set = set()

    def close(self) -> None:
        """Drop the model's broadcast and the cached paths."""
        self.bc.unpersist()
        self.known.unpersist()

    def candidates(self, messages) -> Tuple[Dict[str, int], int, int]:
        """``{path: size}`` of the photos under INPUT the messages announce, and how
        many events were outside INPUT or no photo, and how many test events."""
        out: Dict[str, int] = {}
        outside = tests = 0
        for m in messages:
            tests += int(m.test)
            for e in m.events:
                name = e.key.rsplit("/", 1)[-1]
                if e.bucket != self.bucket or not e.key.startswith(self.prefix):
                    outside += 1
                elif not IMAGE_NAME.match(name):
                    outside += 1
                else:
                    out[e.uri(self.scheme)] = e.size  # the latest event of a key wins
        return out, outside, tests

    def run_once(self, wait_seconds: int = 0, limit: int = DEFAULT_LIMIT) -> QueueReport:
        """Receive, featurize what is new, commit, then delete the messages."""
        from pyspark.sql import functions as F

        t0 = time.perf_counter()
        before = requests_made(self.settings)
        sqs_before = self.queue.counter.snapshot()
        messages = self.queue.receive_many(limit, wait_seconds)
        found, outside, tests = self.candidates(messages)
        n_events = sum(len(m.events) for m in messages)
        spark = self.spark
        run = None
        images = errors = known = 0
        for path in [p for p in found if p in self.committed]:
            del found[path]
            known += 1
        frame = None
        if found:
            cand = spark.createDataFrame(list(found.items()), "path string, length long")
            todo = cand.join(self.known, "path", "left_anti").cache()
            n_todo = todo.count()
            known += len(found) - n_todo
            if n_todo:
                run = new_run_id()
                started = now_iso()
                n_parts = choose_partitions(
                    n_todo, spark.sparkContext.defaultParallelism, self.params.partitions
                )
                frame = featurize_frame(
                    spark,
                    todo.select("path", "length").repartition(n_parts),
                    self.spec,
                    self.payload,
                    self.batch_size,
                    broadcast=self.bc,
                    fetch=self.settings,
                )
                schema = incremental_schema(self.spec)
                rows = frame.df.join(
                    F.broadcast(todo.withColumn("modificationTime", F.lit(None).cast("timestamp"))),
                    "path",
                )
                out = rows.select(
                    *[F.col(f.name).alias(f.name, metadata=f.metadata) for f in schema]
                )
                write_features(spark, out, self.table.staging_uri(run), frame.settings)
                images, errors = frame.images, frame.errors
                self.table.commit(
                    RunRecord(
                        run=run,
                        kind="queue",
                        input=self.input,
                        queue=self.queue.url,
                        started=started,
                        rows=images,
                        new=images,
                        errors=errors,
                        model=self.spec.to_dict(),
                    )
                )
                self.committed.update(r[0] for r in todo.select("path").collect())
                frame.release()
            todo.unpersist()
        # After the commit, never before: a crash until here delivers them again.
        self.queue.delete(m.receipt for m in messages)
        requests = delta(before, requests_made(self.settings))
        for k, v in (frame.requests if frame is not None else {}).items():
            requests[k] = requests.get(k, 0) + v
        for k, v in delta(sqs_before, self.queue.counter.snapshot()).items():
            requests[f"sqs:{k}"] = v
        seconds = time.perf_counter() - t0
        if messages:
            logger.info(
                f"featurize: queue: {len(messages)} messages, {len(found)} photos under "
                f"{self.input} ({known} already featurized): "
                + (f"run {run} committed {images} rows ({errors} errors)" if run else "no run")
            )
        return QueueReport(
            self.input, self.output, self.queue.url, run, len(messages), tests, n_events,
            outside, known, images, errors, seconds, requests,
        )  # fmt: skip


def featurize_from_queue(
    spark, input_path: str, output_path: str, params, queue_url: str, visibility=None
) -> QueueReport:
    """One run of ``featurize --incremental --queue URL`` (see the module docstring)."""
    state = QueueRun(spark, input_path, output_path, params, queue_url, visibility)
    try:
        return state.run_once()
    finally:
        state.close()


def watch_queue(
    spark, input_path: str, features: str, opts, on_run=None, visibility=None
) -> Dict[str, Any]:
    """``watch --queue URL``: runs over the queue until ``stop_after``, Ctrl-C or SIGTERM
    (after the run in progress; ``stopped`` is the signal's number) or, with
    ``available_now``, an empty queue; ``on_run(run)`` after each commit."""
    queue_url = opts.queue
    state = QueueRun(spark, input_path, features, opts, queue_url, visibility)
    totals: Dict[str, Any] = {"batches": 0, "images": 0, "errors": 0, "runs": [],
                              "messages": 0, "skipped": 0}  # fmt: skip
    deadline = None if opts.stop_after is None else time.monotonic() + opts.stop_after
    # Long polling: a receive returns as soon as a message is there, so the wait only
    # bounds how late a stop is noticed.
    wait = 0 if opts.available_now else max(1, min(20, int(round(opts.trigger_seconds))))
    logger.info(f"watch: {queue_url} -> {features} (new photos under {input_path})")
    # Ctrl-C, SIGTERM: the messages received are featurized and committed, then stop.
    with StopSignals() as stop:
        try:
            while stop.signum is None and (deadline is None or time.monotonic() < deadline):
                left = None if deadline is None else max(0, int(deadline - time.monotonic()))
                report = state.run_once(wait if left is None else min(wait, left))
                totals["messages"] += report.messages
                totals["skipped"] += report.already_featurized
                if report.run is not None:
                    totals["batches"] += 1
                    totals["images"] += report.images
                    totals["errors"] += report.errors
                    totals["runs"].append(report.run)
                    if on_run is not None:
                        on_run(report.run)
                if opts.available_now and not report.messages:
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: at once
            logger.info("watch: interrupted: messages not yet committed come back to the queue")
            raise
        finally:
            state.close()
        stop.log_stop("the run in progress")
    return {"queue": queue_url, "stopped": stop.signum, **totals}
