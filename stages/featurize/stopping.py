"""Stopping ``watch`` on Ctrl-C or SIGTERM once the batch (or run) in progress has committed.

Python's default SIGINT raises KeyboardInterrupt wherever the main thread is: inside a
Py4J call (``awaitTermination``, a Spark job) that breaks the gateway's connection, and
the stop then fails with Py4J errors; the default SIGTERM ends the process before
anything is said.  Here a signal only sets a flag (:class:`StopSignals`); the main thread
looks at it between batches (:func:`await_query` for the streaming query, the loop of
:func:`stages.watch_listing.watch_by_listing`) and stops there itself.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import List, Optional

logger = logging.getLogger(__name__)

__all__ = ["StopSignals", "await_query"]

# How often a wait looks at the flag: how late a stop between batches may be noticed.
_TICK = 1.0


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`signum` instead of
    interrupting; a second one raises KeyboardInterrupt (a second Ctrl-C stops at once).
    The previous handlers come back on exit.  Elsewhere than the main thread nothing is
    installed (Python allows handlers there only) and :attr:`signum` stays None."""

    def __init__(self) -> None:
        self._got: List[int] = []
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if self._got:
            raise KeyboardInterrupt
        self._got.append(signum)  # no logging here: the main thread may hold logging's lock

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def signum(self) -> Optional[int]:
        """The first signal received, or None."""
        return self._got[0] if self._got else None

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, a tick at a time, ending early once a signal came (a
        handler that returns lets ``time.sleep`` go on to its end: PEP 475)."""
        end = time.monotonic() + seconds
        while not self._got:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(_TICK, left))

    def log_stop(self, what: str) -> None:
        """The progress line of a stop: ``watch: SIGTERM: stopping after <what>``."""
        if self.signum is not None:
            logger.info(f"watch: {signal.Signals(self.signum).name}: stopping after {what}")


def await_query(query, sink, stop_after: Optional[float], available_now: bool) -> Optional[int]:
    """Wait for the query to end; the signal (SIGINT, SIGTERM) that stopped it, if one did.

    ``sink`` is the query's ``foreachBatch`` function (:class:`stages.watch._Sink`): its
    ``lock`` is held while a batch runs, ``stopping`` makes a batch that starts after the
    signal fail (Spark keeps it for the next start), ``flush_pending`` featurizes the files
    set aside while they were being written.

    A signal only sets a flag (:class:`StopSignals`); the query is stopped here once the
    batch being featurized has committed.  A second Ctrl-C interrupts at once.
    """
    with StopSignals() as stop:
        end = None if stop_after is None else time.monotonic() + stop_after
        while stop.signum is None and query.isActive:
            left = _TICK if end is None else min(_TICK, end - time.monotonic())
            if left <= 0:
                break
            query.awaitTermination(max(left, 0.01))
            if sink.pending and stop.signum is None and sink.lock.acquire(blocking=False):
                try:  # set-aside files settle between triggers too
                    sink.flush_pending(wait=False)
                finally:
                    sink.lock.release()
        if stop.signum is not None:
            stop.log_stop("the current batch")
            sink.stopping.set()
            with sink.lock:  # the batch being featurized commits first
                query.stop()
            return stop.signum
        if not query.isActive:
            query.awaitTermination()  # raises the query's failure, if it failed
            if available_now:
                with sink.lock:
                    sink.flush_pending(wait=True)
        return None
