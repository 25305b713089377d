"""One progress display for a long Spark step: units done, rate and ETA, on the console.

Spark's own console bar (``[Stage 6:=====>   (1 + 1) / 2]``) is switched off by the CLI's
session; :class:`Progress` replaces it with one line per step, in the step's own unit
(images, rows).  A thread polls Spark's status tracker for the jobs of the step's job
group: the share of their tasks done, times the step's total, is what is done (a task
reports when it ends, so the count moves by tasks).  On a terminal the line is rewritten
in place; otherwise (a log file, an EMR step) a line is printed every
:data:`LOG_INTERVAL_S` seconds.  Nothing is shown when the project's console logging is
above INFO (``--quiet``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from typing import Optional, TextIO, Tuple

from stages.base.logs import console_shows

__all__ = ["Progress", "progress_line"]

POLL_S = 0.5
LOG_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(step: str, unit: str, done: float, total: Optional[int], elapsed: float) -> str:
    """``featurize: 1200/4099 images (29%), 45.1 images/s, ETA 1m04s``.

    Parameters
    ----------
    step, unit : str
    done : float
        Units done (a share of ``total`` when the count moves by tasks).
    total : int, optional
        Units of the step; unknown: the count of tasks is shown instead.
    elapsed : float
        Seconds since the step started.
    """
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total:
        return f"{step}: {int(done)} {unit} done, {_duration(elapsed)}"
    share = min(1.0, done / total)
    line = f"{step}: {int(round(done))}/{total} {unit} ({share:.0%}), {rate:.1f} {unit}/s"
    if 0 < share < 1 and rate > 0:
        line += f", ETA {_duration((total - done) / rate)}"
    elif share >= 1:
        line += f", {_duration(elapsed)}"
    return line


class Progress:
    """``with Progress(spark, "featurize", 4099, "images"):`` around a step's Spark jobs.

    Parameters
    ----------
    spark : SparkSession
    step : str
        The command's name in the line (``featurize``, ``reduce``).
    total : int, optional
        Units of the step (images, rows); unknown: tasks are counted.
    unit : str
    stream : file, optional
        Where the line goes (default: ``sys.stderr`` at each write).
    """

    def __init__(
        self,
        spark,
        step: str,
        total: Optional[int],
        unit: str = "images",
        stream: Optional[TextIO] = None,
    ) -> None:
        self.sc = spark.sparkContext
        self.step, self.total, self.unit = step, total, unit
        self.stream = stream
        self.group = f"fruits-pipeline-{step}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = 0.0
        self._last_line = ""
        self.shown = logging.getLogger("stages").getEffectiveLevel() <= logging.INFO
        if stream is None:  # on the console: shown as the console shows INFO (not --quiet)
            self.shown = self.shown and console_shows(logging.INFO)

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def tasks(self) -> Tuple[int, int]:
        """``(done, total)`` tasks of the step's jobs so far."""
        tracker = self.sc.statusTracker()
        done = total = 0
        for job in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job)
            if info is None:
                continue
            for stage in info.stageIds:
                s = tracker.getStageInfo(stage)
                if s is not None:
                    done += s.numCompletedTasks
                    total += s.numTasks
        return done, total

    def settle(self) -> None:
        """Wait until Spark's status listener has taken in every event so far.

        The tracker is fed on the listener bus's own thread, so a job can have returned
        before its last task is counted: the counts of ended jobs are final after this.
        """
        try:
            self.sc._jsc.sc().listenerBus().waitUntilEmpty()
        except Exception:  # a bus slower than its 10 s timeout: the counts as they are
            pass

    def line(self) -> str:
        """The current line."""
        done, total = self.tasks()
        elapsed = time.perf_counter() - self._t0
        if self.total:
            units = self.total * done / total if total else 0.0
            return progress_line(self.step, self.unit, units, self.total, elapsed)
        return progress_line(self.step, "tasks", done, total or None, elapsed)

    def _write(self, line: str, final: bool = False) -> None:
        out = self._out()
        if out.isatty():
            pad = " " * max(0, len(self._last_line) - len(line))
            out.write("\r" + line + pad + ("\n" if final else ""))
        else:
            out.write(line + "\n")
        out.flush()
        self._last_line = line

    def _run(self) -> None:
        tty = self._out().isatty()
        last = time.perf_counter()
        while not self._stop.wait(POLL_S):
            now = time.perf_counter()
            if tty or now - last >= LOG_INTERVAL_S:
                line = self.line()
                if line != self._last_line:
                    self._write(line)
                last = now

    def __enter__(self) -> Progress:
        self._t0 = time.perf_counter()
        # This thread's jobs carry the group (Spark's job group is a thread-local property).
        self.sc.setJobGroup(self.group, f"fruits-pipeline {self.step}")
        if self.shown:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if exc_type is None:
                self.settle()
                self._write(self.line(), final=True)
            elif self._out().isatty() and self._last_line:
                self._out().write("\n")
        self.sc.setLocalProperty("spark.jobGroup.id", None)
        self.sc.setLocalProperty("spark.job.description", None)
