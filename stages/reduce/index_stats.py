"""What ``index.json`` records about its rows, each measured on a bounded sample: the
approximate search's ``nprobe`` and recall@10, the bucket's nearest-neighbour distances
and the open-set
rule (:mod:`linalg.openset`, calibrated on at most
:data:`~linalg.openset.CALIBRATION_ROWS` reference rows, chosen by a hash of their paths and
put in path order)."""

from __future__ import annotations

import time
from typing import Any, Dict

from linalg.openset import CALIBRATION_ROWS, calibrate, reference_rows
from linalg.vectors import (
    TARGET_RECALL,
    choose_nprobe,
    exact_neighbours,
    neighbour_distances,
    recall_rows,
)
from stages.storage.shards import ShardSet

__all__ = ["OPEN_SET_SEED", "PATH_KEY", "open_set_rule", "open_set_summary", "statistics"]

OPEN_SET_SEED = 0
PATH_KEY = "blake2b-64 of the path"  # what samples the reference rows (keys.npy)


def statistics(meta: Dict[str, Any], index, shards: ShardSet, generation: int) -> None:
    """The IVF's ``nprobe`` (the smallest reaching :data:`~linalg.vectors.TARGET_RECALL`)
    and its recall, the bucket's neighbour distances and the open-set rule, into
    ``meta`` (``index.nprobe`` set too); each on a bounded sample of rows."""
    if index.ann is not None:
        rows = recall_rows(len(index))
        exact = exact_neighbours(index, rows, 10)  # the only exact queries over every row
        index.nprobe, meta["recall_at_10"] = choose_nprobe(index, rows, exact)
        meta["ivf"].update(nprobe=index.nprobe, target_recall=TARGET_RECALL)
        meta["recall_queries"] = int(len(rows))
    else:
        meta["recall_at_10"] = 1.0  # exact search, by construction
    # With an IVF index, found by its own search (as the app's queries are): exact
    # queries over a million rows cost ~20 ms each.
    meta["neighbour_distance"] = neighbour_distances(index, exact=index.ann is None)
    meta["open_set"] = open_set_rule(shards)
    meta["statistics_generation"] = generation


def open_set_rule(shards: ShardSet) -> Dict[str, Any]:
    """The ``open_set`` entry of ``index.json``: :func:`linalg.openset.calibrate` on the
    index's reference rows: all of them up to :data:`~linalg.openset.CALIBRATION_ROWS`, above
    the rows with the smallest keys (each shard's ``keys.npy``, a hash of the row's path: a
    pass over the keys, one shard at a time, so the driver's work stays bounded), in path
    order, and which rows those are (``reference.of``: the rows there were; rows appended
    later are not reference rows).  Chosen and ordered by path, the rule does not depend on
    the shards' row order."""
    n = len(shards)
    ref = reference_rows(shards.key_blocks(), CALIBRATION_ROWS)
    t0 = time.perf_counter()
    rule = calibrate(
        shards.take(ref),
        [shards.label(int(i)) for i in ref],
        seed=OPEN_SET_SEED,
        keys=[shards.path(int(i)) for i in ref],  # path order: where the bucket lies is moot
    )
    rule["reference"] = {
        "rows": int(len(ref)),
        "of": n,
        "seed": OPEN_SET_SEED,
        "sampled_by": PATH_KEY,
        "ordered_by": "path",
    }
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
