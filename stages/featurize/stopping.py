"""Stopping ``watch``'s streaming query on Ctrl-C or SIGTERM once its batch has committed.

Python's default SIGINT raises KeyboardInterrupt wherever the main thread is: inside a
Py4J call (``awaitTermination``) that breaks the gateway's connection, and the stop
then fails with Py4J errors.  Here a signal only sets a flag; the main thread waits on
the query a second at a time and stops it itself.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import List, Optional

logger = logging.getLogger(__name__)

__all__ = ["await_query"]


def await_query(query, sink, stop_after: Optional[float], available_now: bool) -> Optional[int]:
    """Wait for the query to end; the signal (SIGINT, SIGTERM) that stopped it, if one did.

    ``sink`` is the query's ``foreachBatch`` function (:class:`stages.watch._Sink`): its
    ``lock`` is held while a batch runs, ``stopping`` makes a batch that starts after the
    signal fail (Spark keeps it for the next start), ``flush_pending`` featurizes the files
    set aside while they were being written.

    A signal only sets a flag (a KeyboardInterrupt inside a Py4J call would break the
    gateway's connection); the query is stopped here once the batch being featurized has
    committed.  A second Ctrl-C interrupts at once.
    """
    got: List[int] = []

    def on_signal(signum, frame) -> None:
        if got:
            raise KeyboardInterrupt
        got.append(signum)  # no logging here: the main thread may hold logging's lock

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        end = None if stop_after is None else time.monotonic() + stop_after
        while not got and query.isActive:
            left = 1.0 if end is None else min(1.0, end - time.monotonic())
            if left <= 0:
                break
            query.awaitTermination(max(left, 0.01))
            if sink.pending and not got and sink.lock.acquire(blocking=False):
                try:  # set-aside files settle between triggers too
                    sink.flush_pending(wait=False)
                finally:
                    sink.lock.release()
        if got:
            logger.info(f"watch: {signal.Signals(got[0]).name}: stopping after the current batch")
            sink.stopping.set()
            with sink.lock:  # the batch being featurized commits first
                query.stop()
            return got[0]
        if not query.isActive:
            query.awaitTermination()  # raises the query's failure, if it failed
            if available_now:
                with sink.lock:
                    sink.flush_pending(wait=True)
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
