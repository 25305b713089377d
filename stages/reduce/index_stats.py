"""What ``index.json`` records about its rows, each measured on a bounded sample: the
approximate search's recall@10, the bucket's nearest-neighbour distances and the open-set
rule (:mod:`linalg.openset`, calibrated on at most
:data:`~linalg.openset.CALIBRATION_ROWS` reference rows)."""

from __future__ import annotations

import time
from typing import Any, Dict

from linalg.openset import CALIBRATION_ROWS, calibrate, reference_rows
from linalg.vectors import RECALL_QUERIES, neighbour_distances, recall_at
from stages.storage.shards import ShardSet

__all__ = ["OPEN_SET_SEED", "open_set_rule", "open_set_summary", "statistics"]

OPEN_SET_SEED = 0


def statistics(meta: Dict[str, Any], index, shards: ShardSet, generation: int) -> None:
    """Recall (approximate search), the bucket's neighbour distances and the open-set
    rule, into ``meta``; each on a bounded sample of rows."""
    n = len(index)
    if index.hnsw is not None:
        meta["recall_at_10"] = recall_at(index, 10)
        meta["recall_queries"] = min(RECALL_QUERIES, n)
    else:
        meta["recall_at_10"] = 1.0  # exact search, by construction
    meta["neighbour_distance"] = neighbour_distances(index)
    meta["open_set"] = open_set_rule(shards)
    meta["statistics_generation"] = generation


def open_set_rule(shards: ShardSet) -> Dict[str, Any]:
    """The ``open_set`` entry of ``index.json``: :func:`linalg.openset.calibrate` on the
    index's reference rows (all of them up to :data:`~linalg.openset.CALIBRATION_ROWS`, a
    seeded sample above: the driver's work stays bounded), and which rows those are
    (``reference.of``: the rows there were; rows appended later are not reference rows)."""
    n = len(shards)
    ref = reference_rows(n, CALIBRATION_ROWS, OPEN_SET_SEED)
    t0 = time.perf_counter()
    rule = calibrate(shards.take(ref), [shards.label(int(i)) for i in ref], seed=OPEN_SET_SEED)
    rule["reference"] = {"rows": int(len(ref)), "of": n, "seed": OPEN_SET_SEED}
    rule["calibration_s"] = round(time.perf_counter() - t0, 3)
    return rule


def open_set_summary(rule: Dict[str, Any]) -> str:
    """One line on the open-set rule of an index: what it is and what was measured."""
    if not rule.get("calibrated"):
        return f"open set not calibrated ({rule['reason']}): fallback, {rule['fallback']}"
    return (
        f"open set: {rule['rule']} <= {rule['threshold']:.3f}, calibrated by leaving "
        f"{rule['held_out_classes_per_repeat']} of {rule['classes']} classes out "
        f"{rule['repeats']} times: {rule['known_accepted']:.0%} of held-out photos of known "
        f"classes accepted, {rule['unknown_rejected']:.0%} of held-out classes refused, "
        f"AUROC {rule['auroc']:.3f}"
    )
