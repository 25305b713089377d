"""Task packing by image count (pure: simulates Spark's FilePartition bin packing)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.featurize.frame import choose_partitions, packing


def spark_pack(sizes, open_cost: int, max_split: int):
    """Spark 3.5 FilePartition.getFilePartitions: largest first, close when full."""
    parts, current, size = [], [], 0
    for length in sorted(sizes, reverse=True):
        if current and size + length > max_split:
            parts.append(current)
            current, size = [], 0
        current.append(length)
        size += length + open_cost
    if current:
        parts.append(current)
    return parts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5_000_000), min_size=1, max_size=400), st.integers(1, 64))
def test_every_task_gets_the_same_image_count(sizes, n_parts):
    n_parts = min(n_parts, len(sizes))
    open_cost, split = packing(len(sizes), n_parts, sum(sizes), max(sizes))
    parts = spark_pack(sizes, open_cost, split)
    q = math.ceil(len(sizes) / n_parts)
    assert all(len(p) == q for p in parts[:-1])
    assert 1 <= len(parts[-1]) <= q
    assert len(parts) == math.ceil(len(sizes) / q)


def test_partitions_from_the_image_count():
    assert choose_partitions(1000, 2) == 2  # one task per core
    assert choose_partitions(5000, 2) == 4  # at most 2048 images a task, whole waves
    assert choose_partitions(4099, 2) == 4
    assert choose_partitions(100_000, 8) == 56
    assert choose_partitions(3, 8) == 3  # never an empty task
    assert choose_partitions(1000, 2, requested=7) == 7


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300_000), st.integers(1, 64))
def test_tasks_come_in_full_waves_of_equal_tasks(n, slots):
    p = choose_partitions(n, slots)
    q = math.ceil(n / p)
    assert math.ceil(n / q) == p  # what the packing gives is what was chosen
    if n >= slots * slots:
        assert p % slots == 0  # every wave full
        assert q <= max(2048, math.ceil(n / slots))  # small enough tasks
    else:
        assert p <= slots  # one wave
