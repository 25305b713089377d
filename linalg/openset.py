"""The open-set rule: does a photo's nearest bucket image make it a known fruit? (pure numpy)

A search always returns neighbours; a fruit the bucket has never seen still gets a nearest
image and a label.  This module decides, from how far the photo lies from the bucket, whether
to name it, with a threshold calibrated on the bucket itself by **leave-classes-out**: hold
whole classes out (they play the unknown fruits) and some images of the kept classes (they
play new photos of known fruits), score both against the rest, repeat, and set the threshold
so that :data:`TPR` of the known photos are accepted (Sun et al., ICML 2022, "Out-of-
Distribution Detection with Deep Nearest Neighbors").

The scores see directions only (L2-normalised rows), so a second test guards the range: a
photo whose vector is longer than :data:`RANGE_FACTOR` x the 99th percentile of the
reference rows' norms (the index holds centred PCA scores: the norm is the distance from the
collection's mean) lies outside everything the collection holds and is refused whatever its
direction (a colour gradient can point like an apple from far away).  The calibration
counts it: such a photo scores ``inf``.

Every score is computed on L2-normalised vectors against a **reference set**: the index's
rows, or above :data:`CALIBRATION_ROWS` the rows with the smallest keys (a hash of each photo's
path), the same rows at calibration and at query time, so a query's score has the distribution
that was calibrated and the work stays bounded whatever the bucket's size.  Both put the rows
in path order first (:mod:`linalg.reference`), so the rule does not depend on the order the
rows are stored in.  Lower scores are more
"known"; a photo is accepted when ``score <= threshold`` and its norm is within
``range_limit``.  The rules (:data:`RULES`):

- ``knn``: the distance to the k-th nearest reference row (Sun et al.), k in :data:`KS`;
- ``class``: the distance to the nearest row over that row's class scale (the 95th
  percentile of the class's own nearest-neighbour distances): a per-class statistic;
- ``ratio``: distance to the nearest over distance to the :data:`VOTE_K`-th;
- ``margin``: minus the vote margin of the :data:`VOTE_K` nearest ((first - second) / k).

:func:`calibrate` measures each one and keeps the one that refuses the most held-out classes
at the target TPR (AUROC breaks ties).  A collection that cannot be calibrated (one class,
or too few photos: :func:`calibration_problem`) gets the fallback rule, Sun et al.'s threshold
without held-out classes: the nearest row within the 95th percentile of the collection's
leave-one-out nearest-neighbour distances, marked ``calibrated: false`` with the reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from linalg.reference import CALIBRATION_ROWS, canonical_order, nearest, reference_rows
from linalg.roc import auroc, fpr_at_tpr, threshold_at

__all__ = [
    "CALIBRATION_ROWS",
    "KS",
    "RULES",
    "TPR",
    "OpenSet",
    "auroc",
    "calibrate",
    "canonical_order",
    "calibration_problem",
    "fpr_at_tpr",
    "l2_normalise",
    "nearest",
    "reference_rows",
    "row_norms",
    "scores",
    "threshold_at",
]

REPEATS = 5
HOLDOUT_CLASSES = 0.2  # share of the classes held out per repeat (>= 1, <= classes - 1)
HOLDOUT_IMAGES = 0.2  # share of each kept class's rows held out as known queries
QUERIES_MAX = 1000  # known and unknown queries per repeat, each
TPR = 0.95  # share of known photos the threshold accepts (Sun et al.)
KS = (1, 2, 3, 5, 10)
VOTE_K = 10
RANGE_FACTOR = 1.5  # x the p99 of the reference rows' norms: the range guard
RULES = tuple(f"knn{k}" for k in KS) + ("class", "ratio", "margin")
MIN_ROWS = 20
MIN_CLASS_ROWS = 2  # a class needs this many rows to give held-out known photos


def _scaled(X: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Scaled by the largest entry first: squares of tiny (or huge) rows would underflow
    # (overflow) and leave them unnormalised.
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    big = np.abs(X).max(axis=1, initial=0.0)
    Y = X / np.where(big > 0, big, 1.0)[:, None]
    return Y, big, np.sqrt(np.einsum("ij,ij->i", Y, Y))


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` scaled to unit Euclidean norm, float64 (zero rows stay zero)."""
    Y, _, norms = _scaled(X)
    return Y / np.where(norms > 0, norms, 1.0)[:, None]


def row_norms(X: np.ndarray) -> np.ndarray:
    """The Euclidean norm of each row of ``X``, float64, without under- or overflow."""
    _, big, norms = _scaled(X)
    return big * norms


def range_limit(norms: np.ndarray) -> float:
    """The range guard: :data:`RANGE_FACTOR` x the 99th percentile of ``norms``."""
    return float(RANGE_FACTOR * np.quantile(norms, 0.99))


def _vote_margin(labels: np.ndarray) -> np.ndarray:
    out = np.empty(labels.shape[0], dtype=np.float64)
    for i, row in enumerate(labels):
        counts = sorted(Counter(row.tolist()).values(), reverse=True) + [0]
        out[i] = (counts[0] - counts[1]) / len(row)
    return out


def scores(
    rule: str,
    dist: np.ndarray,
    labels: np.ndarray,
    class_scale: Optional[Dict[Any, float]] = None,
    default_scale: float = 1.0,
) -> np.ndarray:
    """The open-set score of each query (lower is more "known") from its nearest reference
    rows: ``dist`` (q, m) ascending and their ``labels`` (q, m), m >= the rule's need."""
    dist = np.asarray(dist, dtype=np.float64)
    if rule.startswith("knn"):
        k = min(int(rule[3:]), dist.shape[1])
        return dist[:, k - 1].copy()
    if rule == "class":
        scale = np.array([(class_scale or {}).get(lab, default_scale) for lab in labels[:, 0]])
        return dist[:, 0] / np.where(scale > 0, scale, default_scale or 1.0)
    if rule == "ratio":
        far = dist[:, min(VOTE_K, dist.shape[1]) - 1]
        return np.where(far > 0, dist[:, 0] / np.where(far > 0, far, 1.0), 1.0)
    if rule == "margin":
        return -_vote_margin(np.asarray(labels)[:, :VOTE_K])
    raise ValueError(f"unknown open-set rule {rule!r} (one of {', '.join(RULES)})")


def calibration_problem(labels: Sequence[Any]) -> Optional[str]:
    """Why a collection cannot be calibrated by holding classes out, or ``None``."""
    counts = Counter(labels)
    if len(counts) < 2:
        return f"{len(counts)} class: no class can be held out as an unknown fruit"
    if len(labels) < MIN_ROWS:
        return f"{len(labels)} photos: fewer than {MIN_ROWS} to hold some out"
    if sum(c >= MIN_CLASS_ROWS for c in counts.values()) < 2:
        return f"fewer than 2 classes with {MIN_CLASS_ROWS} photos or more"
    return None


def _class_scale(R: np.ndarray, labels: np.ndarray, rng) -> Tuple[Dict[Any, float], float]:
    """Per class, the 95th percentile of its rows' distances to their nearest other row
    (on at most :data:`QUERIES_MAX` sampled rows); and the same over all sampled rows."""
    rows = np.sort(rng.choice(len(R), size=min(QUERIES_MAX, len(R)), replace=False))
    ids, dist = nearest(R[rows], R, 2)
    nn = np.where(ids[:, 0] == rows, dist[:, -1], dist[:, 0])
    lab = labels[rows]
    scale = {c: float(np.quantile(nn[lab == c], 0.95)) for c in np.unique(lab)}
    return scale, float(np.quantile(nn, 0.95))


def _held_out_count(n_classes: int) -> int:
    return min(max(1, int(round(HOLDOUT_CLASSES * n_classes))), n_classes - 1)


def _fold(n_classes: int, repeats: int, rng) -> List[np.ndarray]:
    """The held-out class indices of each repeat: consecutive blocks of one seeded
    permutation, so the repeats spread over all classes."""
    h = _held_out_count(n_classes)
    perm = rng.permutation(n_classes)
    return [perm[(np.arange(h) + r * h) % n_classes] for r in range(repeats)]


def _rule_scores(Q, R, labels, scale, default) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    ids, dist = nearest(Q, R, VOTE_K)
    lab = labels[ids]
    out = {r: scores(r, dist, lab, scale, default) for r in RULES}
    voted = np.array([Counter(row.tolist()).most_common(1)[0][0] for row in lab])
    return out, voted


def calibrate(
    vectors: np.ndarray,
    labels: Sequence[Any],
    seed: int = 0,
    repeats: int = REPEATS,
    tpr: float = TPR,
    keys: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Choose the open-set rule and its threshold for a collection (leave-classes-out).

    Parameters
    ----------
    vectors : ndarray (n, k)
        The reference rows (the index's rows, or :func:`reference_rows` of them).
    labels : sequence of n labels
    seed : int
        Seeds the held-out classes, images and query samples: same input, same rule.
    repeats : int
        Leave-classes-out repeats, pooled.
    tpr : float
        The share of held-out known photos the threshold accepts.
    keys : sequence of n, optional
        Stable ids of the rows, compared as they sort (the index's: its photos' paths).  The
        rows are put in :func:`canonical_order` first: the result does not depend on their
        order.

    Returns
    -------
    dict
        For ``index.json``: ``rule``, ``threshold``, ``calibrated``, the measured rates
        (``known_accepted``, ``known_right``, ``unknown_rejected``, ``auroc``,
        ``fpr_at_95_tpr``), every rule's ``candidates`` and how they were measured.
    """
    vectors = np.atleast_2d(np.asarray(vectors))
    labels = np.asarray(labels, dtype=object)
    if len(labels) != vectors.shape[0]:
        raise ValueError(f"{vectors.shape[0]} vectors but {len(labels)} labels")
    if keys is not None and len(keys) != vectors.shape[0]:
        raise ValueError(f"{vectors.shape[0]} vectors but {len(keys)} keys")
    order = canonical_order(vectors, labels, keys)
    vectors, labels = vectors[order], labels[order]
    # Normalised in float64, kept in float32 as the app keeps them (the same scores).
    X = l2_normalise(vectors).astype(np.float32)
    norms = row_norms(vectors)
    problem = calibration_problem(labels.tolist())
    if problem is not None:
        return _fallback(X, norms, problem)
    rng = np.random.default_rng(seed)
    classes = np.array(sorted(set(labels.tolist()), key=str), dtype=object)
    known: Dict[str, List[np.ndarray]] = {r: [] for r in RULES}
    unknown: Dict[str, List[np.ndarray]] = {r: [] for r in RULES}
    right: List[np.ndarray] = []
    n_known = n_unknown = 0
    for held in _fold(len(classes), repeats, rng):
        out = np.isin(labels, classes[held])
        q_known = []
        for c in classes[np.setdiff1d(np.arange(len(classes)), held)]:
            rows = np.flatnonzero(labels == c)
            if len(rows) >= MIN_CLASS_ROWS:
                m = min(len(rows) - 1, max(1, int(round(HOLDOUT_IMAGES * len(rows)))))
                q_known.extend(rng.choice(rows, size=m, replace=False).tolist())
        q_known = np.sort(np.array(q_known, dtype=np.int64))
        keep = ~out
        keep[q_known] = False
        q_unknown = np.flatnonzero(out)
        q_known = _at_most(q_known, rng)
        q_unknown = _at_most(q_unknown, rng)
        R, lab = X[keep], labels[keep]
        limit = range_limit(norms[keep])
        scale, default = _class_scale(R, lab, rng)
        s_known, voted = _rule_scores(X[q_known], R, lab, scale, default)
        s_unknown, _ = _rule_scores(X[q_unknown], R, lab, scale, default)
        for r in RULES:  # out of range: refused whatever the score
            known[r].append(np.where(norms[q_known] <= limit, s_known[r], np.inf))
            unknown[r].append(np.where(norms[q_unknown] <= limit, s_unknown[r], np.inf))
        right.append(voted == labels[q_known])
        n_known += len(q_known)
        n_unknown += len(q_unknown)
    right_all = np.concatenate(right)
    candidates = {}
    for r in RULES:
        k, u = np.concatenate(known[r]), np.concatenate(unknown[r])
        t = threshold_at(k, tpr)
        candidates[r] = {
            "threshold": t,
            "known_accepted": float(np.mean(k <= t)),
            "known_right": float(np.mean((k <= t) & right_all)),
            "unknown_rejected": float(np.mean(u > t)),
            "auroc": auroc(k, u),
            "fpr_at_95_tpr": fpr_at_tpr(k, u, 0.95),
        }
    best = min(RULES, key=lambda r: _preference(r, candidates[r]))
    result: Dict[str, Any] = {"rule": best, "calibrated": True, **candidates[best]}
    result["range_limit"] = range_limit(norms)
    if best == "class":
        scale, default = _class_scale(X, labels, np.random.default_rng(seed))
        result["class_scale"] = {str(c): v for c, v in scale.items()}
        result["default_scale"] = default
    result.update(
        tpr_target=tpr,
        seed=seed,
        repeats=repeats,
        classes=len(classes),
        held_out_classes_per_repeat=_held_out_count(len(classes)),
        known_queries=n_known,
        unknown_queries=n_unknown,
        candidates=candidates,
    )
    return result


def _preference(rule: str, rates: Dict[str, float]) -> Tuple[float, float, int]:
    """Most unknown photos refused at the target TPR, then AUROC, then the order of
    :data:`RULES` (the literature's k-th NN first), rates compared to 2 and 3 decimals:
    with at most a few thousand held-out photos, finer differences are noise."""
    return (-round(rates["unknown_rejected"], 2), -round(rates["auroc"], 3), RULES.index(rule))


def _at_most(rows: np.ndarray, rng) -> np.ndarray:
    if len(rows) <= QUERIES_MAX:
        return rows
    return np.sort(rng.choice(rows, size=QUERIES_MAX, replace=False))


def _fallback(X: np.ndarray, norms: np.ndarray, reason: str) -> Dict[str, Any]:
    """The documented rule for a collection too small to calibrate (Sun et al.'s threshold
    without held-out classes): accept a photo whose nearest row is within the 95th
    percentile of the rows' distances to their nearest *other* row (and within the range
    guard); nothing is accepted with a single row (no distance to measure).  How many
    unknown fruits it refuses is unknown."""
    out: Dict[str, Any] = {"rule": "knn1", "calibrated": False, "reason": reason}
    if X.shape[0] < 2:
        out["threshold"] = None
        out["fallback"] = "a single photo: nothing to measure, every query is 'no close match'"
        return out
    rows = np.arange(min(X.shape[0], QUERIES_MAX))
    ids, dist = nearest(X[rows], X, 2)
    nn = np.where(ids[:, 0] == rows, dist[:, -1], dist[:, 0])
    out["threshold"] = threshold_at(nn, TPR)
    out["range_limit"] = range_limit(norms)
    out["known_accepted"] = float(np.mean(nn <= out["threshold"]))
    out["fallback"] = (
        f"nearest photo within the distance at which {TPR:.0%} of the collection's photos "
        "have another photo (each asked with itself left out)"
    )
    return out


class OpenSet:
    """A calibrated rule applied to queries: the reference rows, normalised, and the dict of
    :func:`calibrate`.

    Parameters
    ----------
    rule : dict
        What :func:`calibrate` returned (from ``index.json``).
    reference : ndarray (m, k)
        The reference rows (:func:`reference_rows` of the index's vectors).
    labels : sequence of m labels
    keys : sequence of m, optional
        The rows' keys, as given to :func:`calibrate`: the rows are put in the same
        :func:`canonical_order` (ties between equally near rows go the same way).
    """

    def __init__(
        self,
        rule: Dict[str, Any],
        reference: np.ndarray,
        labels: Sequence[Any],
        keys: Optional[Sequence[Any]] = None,
    ) -> None:
        self.rule = rule
        reference = np.atleast_2d(np.asarray(reference))
        order = canonical_order(reference, labels, keys)
        self.reference = l2_normalise(reference[order]).astype(np.float32)
        self._sq = np.einsum("ij,ij->i", self.reference, self.reference)
        self.labels = np.asarray(labels, dtype=object)[order]
        self._scale = {str(k): v for k, v in (rule.get("class_scale") or {}).items()}

    def score(self, queries: np.ndarray) -> np.ndarray:
        """The rule's score of each query (lower is more "known")."""
        q = l2_normalise(np.atleast_2d(queries))
        ids, dist = nearest(q, self.reference, VOTE_K, self._sq)
        lab = np.array([[str(x) for x in row] for row in self.labels[ids]], dtype=object)
        return scores(
            self.rule["rule"], dist, lab, self._scale, self.rule.get("default_scale", 1.0)
        )

    def accept(self, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(accepted, score, in_range)`` of each query: accepted when in range (norm
        within ``range_limit``) and ``score <= threshold``."""
        s = self.score(queries)
        in_range = row_norms(queries) <= float(self.rule.get("range_limit", np.inf))
        t = self.rule.get("threshold")
        if t is None:
            return np.zeros(len(s), dtype=bool), s, in_range
        return (s <= float(t)) & in_range, s, in_range
