"""Small Spark helpers shared by the stages (driver side)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict

__all__ = ["SetAccumulator", "session_conf"]


class SetAccumulator:
    """``AccumulatorParam`` of a set (worker pids, vector lengths seen)."""

    def zero(self, value):
        return set()

    def addInPlace(self, a, b):
        a |= b
        return a


@contextmanager
def session_conf(spark, settings: Dict[str, str]):
    """Set Spark SQL ``settings`` for the ``with`` block, then put the old values back."""
    old = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)
