"""ROC measures of a score where lower means "accept" (pure numpy): the threshold at a true-
positive rate, the false-positive rate there, and the area under the curve."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "fpr_at_tpr", "threshold_at"]


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(a known photo scores below an unknown one), ties counted half: the area under the
    ROC curve of the rule ``score <= t``."""
    known = np.asarray(known, dtype=np.float64)
    unknown = np.sort(np.asarray(unknown, dtype=np.float64))
    below = len(unknown) - np.searchsorted(unknown, known, side="right")
    ties = np.searchsorted(unknown, known, side="right") - np.searchsorted(unknown, known)
    return float((below.sum() + 0.5 * ties.sum()) / (len(known) * len(unknown)))


def threshold_at(known: np.ndarray, tpr: float = 0.95) -> float:
    """The smallest threshold that accepts at least ``tpr`` of ``known`` (``score <= t``);
    the largest finite score when that would be ``inf`` (too many out of range)."""
    known = np.sort(np.asarray(known, dtype=np.float64))
    i = int(np.ceil(tpr * len(known) - 1e-9)) - 1
    t = float(known[min(max(i, 0), len(known) - 1)])
    if np.isinf(t):
        finite = known[np.isfinite(known)]
        t = float(finite[-1]) if finite.size else 0.0
    return t


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The share of ``unknown`` accepted by the threshold that accepts ``tpr`` of ``known``."""
    return float(np.mean(np.asarray(unknown) <= threshold_at(known, tpr)))
