"""``watch`` on S3 without a queue: a ``featurize --incremental`` run every trigger.

Spark's file stream source costs, on S3, a LIST per new file and a HEAD per new file each
micro-batch, skips ``_``/``.`` names, and keeps every file it has seen in its log for ever;
:func:`watch_by_listing` runs the incremental plan instead (LISTs only, each new photo read
once, exactly once by the table's manifest).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict

from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams, ModelParams, WatchParams
from stages.featurize.incremental import featurize_incremental
from stages.featurize.stopping import StopSignals
from stages.reduce.update import project_run
from stages.storage.table import FeaturesTable

logger = logging.getLogger(__name__)


def watch_by_listing(spark, input_path, features, opts: WatchParams, model) -> Dict[str, Any]:
    """S3 without a queue: a ``featurize --incremental`` run every trigger.

    Spark's file stream source costs, on S3, a LIST per new file and a HEAD per new
    file each micro-batch, skips ``_``/``.`` names, and keeps every file it has seen
    in its log for ever.  The incremental plan lists with LISTs only (the executors',
    one per 1000 objects), keeps every name plain ``featurize`` keeps, reads each new
    photo once, and is exactly once by the table's manifest (no checkpoint needed).

    Ctrl-C or SIGTERM: the run in progress commits (and is projected), then the loop
    ends; ``stopped`` in the result is the signal's number (None otherwise).
    """
    model_fields = [f.name for f in dataclasses.fields(ModelParams)]
    params = FeaturizeParams.of(
        None, incremental=True, **{name: getattr(opts, name) for name in model_fields}
    )
    totals: Dict[str, Any] = {"batches": 0, "images": 0, "errors": 0, "runs": []}
    start = time.monotonic()
    with StopSignals() as stop:  # Ctrl-C, SIGTERM: the run in progress commits, then stop
        while stop.signum is None:
            t = time.monotonic()
            try:
                report = featurize_incremental(spark, input_path, features, params)
            except UsageError as exc:
                if not str(exc).startswith("no .jpg"):
                    raise
                report = None  # nothing under INPUT yet: wait for the first photo
            if report is not None and report.run is not None:
                totals["batches"] += 1
                totals["images"] += report.images
                totals["errors"] += report.errors
                totals["runs"].append(report.run)
                if model is not None:
                    rows = project_run(spark, FeaturesTable(spark, features), report.run,
                                       model, opts.results)  # fmt: skip
                    logger.info(f"watch: run {report.run}: {rows} projected")
            if opts.available_now:
                break
            now = time.monotonic()
            if opts.stop_after is not None and now - start >= opts.stop_after:
                break
            pause = max(0.0, t + opts.trigger_seconds - now)
            if opts.stop_after is not None:
                pause = min(pause, max(0.0, start + opts.stop_after - now))
            stop.sleep(pause)
        stop.log_stop("the run in progress")
    return {"input": input_path, "mode": "listing", "stopped": stop.signum, **totals}
