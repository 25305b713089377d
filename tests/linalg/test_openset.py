"""Properties of the open-set kernel (:mod:`linalg.openset`): numpy references, no Spark."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from linalg import openset

FLOATS = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def matrices(draw, min_rows=1, max_rows=30):
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, 6))
    return draw(arrays(np.float64, (n, d), elements=FLOATS))


def clusters(n_classes: int, per_class: int, d: int = 8, spread: float = 0.05, seed: int = 0):
    """Rows around ``n_classes`` random unit directions (tight clusters on the sphere)."""
    rng = np.random.default_rng(seed)
    centres = openset.l2_normalise(rng.normal(size=(n_classes, d)))
    X = np.repeat(centres, per_class, axis=0) + rng.normal(size=(n_classes * per_class, d)) * spread
    X *= rng.uniform(0.5, 20.0, size=(len(X), 1))  # the norm must not matter
    labels = [f"c{i}" for i in range(n_classes) for _ in range(per_class)]
    return X, labels


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_l2_normalise_gives_unit_rows_and_keeps_zero_rows(X):
    N = openset.l2_normalise(X)
    zero = ~X.any(axis=1)  # not a norm of 0: tiny rows' squares underflow, they still count
    np.testing.assert_allclose(np.linalg.norm(N[~zero], axis=1), 1.0, rtol=1e-12)
    assert np.all(N[zero] == 0)
    np.testing.assert_allclose(openset.l2_normalise(3.0 * X), N, rtol=1e-12, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(matrices(), matrices(), st.integers(1, 12))
def test_nearest_equals_brute_force(Q, R, k):
    if Q.shape[1] != R.shape[1]:
        R = np.resize(R, (R.shape[0], Q.shape[1]))
    ids, dist = openset.nearest(Q, R, k)
    full = np.linalg.norm(Q[:, None, :] - R[None, :, :], axis=2)
    assert ids.shape == dist.shape == (len(Q), min(k, len(R)))
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, : ids.shape[1]], atol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(full, ids, 1), dist, atol=1e-9)
    assert np.all(np.diff(dist, axis=1) >= 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 12))
def test_nearest_on_float32_unit_rows_equals_brute_force(seed, n, k):
    rng = np.random.default_rng(seed)
    R = openset.l2_normalise(rng.normal(size=(n, 5))).astype(np.float32)
    Q = openset.l2_normalise(rng.normal(size=(7, 5)))
    ids, dist = openset.nearest(Q, R, k)
    full = np.linalg.norm(Q[:, None, :] - R[None, :, :].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, : ids.shape[1]], atol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(full, ids, 1), dist, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=40),
    st.lists(st.integers(0, 20), min_size=1, max_size=40),
)
def test_auroc_equals_pairwise_count(known, unknown):
    k, u = np.array(known, float), np.array(unknown, float)
    ref = np.mean((k[:, None] < u[None, :]) + 0.5 * (k[:, None] == u[None, :]))
    assert openset.auroc(k, u) == pytest.approx(ref, abs=1e-12)
    assert openset.auroc(k, u) + openset.auroc(u, k) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60),
    st.floats(0.01, 1.0),
)
def test_threshold_is_the_smallest_that_accepts_the_tpr(known, tpr):
    k = np.array(known)
    t = openset.threshold_at(k, tpr)
    assert t in k
    assert np.mean(k <= t) >= tpr - 1e-9
    below = k[k < t]
    if below.size:  # any smaller threshold accepts too few
        assert np.mean(k <= below.max()) < tpr


@settings(max_examples=60, deadline=None)
@given(matrices(min_rows=2), st.integers(0, 3))
def test_scores_orders_and_ranges(R, n_labels):
    labels = np.array([f"l{i % (n_labels + 1)}" for i in range(len(R))], dtype=object)
    ids, dist = openset.nearest(R, R, openset.VOTE_K)
    lab = labels[ids]
    knn = [openset.scores(f"knn{k}", dist, lab) for k in openset.KS]
    for a, b in zip(knn, knn[1:]):
        assert np.all(a <= b)  # the k-th neighbour is never nearer than an earlier one
    ratio = openset.scores("ratio", dist, lab)
    assert np.all((ratio >= 0) & (ratio <= 1))
    margin = openset.scores("margin", dist, lab)
    assert np.all((margin >= -1) & (margin <= 0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 5), min_size=0, max_size=60),
    st.integers(1, 70),
    st.lists(st.integers(1, 25), min_size=1, max_size=8),
)
def test_reference_rows_are_the_rows_with_the_smallest_keys(keys, rows_max, sizes):
    """Whatever the blocks the keys come in: the ``rows_max`` smallest, in key order, ties by
    row id (the small integers make ties)."""
    keys = np.array(keys, dtype=np.uint64)
    cuts = np.unique(np.clip(np.cumsum(sizes), 0, len(keys)))
    blocks = [(int(a), keys[a:b]) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(keys)])]
    got = openset.reference_rows(blocks, rows_max)
    want = np.lexsort((np.arange(len(keys)), keys))[:rows_max]
    assert np.array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_reference_rows_are_the_same_photos_in_any_order(seed, rows_max):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**63, size=int(rng.integers(1, 80)), dtype=np.uint64)
    perm = rng.permutation(len(keys))
    a = openset.reference_rows([(0, keys)], rows_max)
    b = openset.reference_rows([(0, keys[perm][:7]), (7, keys[perm][7:])], rows_max)
    assert np.array_equal(keys[a], keys[perm][b])  # the same keys, in the same (key) order


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 6),
    st.integers(3, 9),
    st.booleans(),
    st.booleans(),
)
def test_calibrate_and_scores_do_not_depend_on_the_rows_order(
    seed, n_classes, per_class, with_keys, duplicates
):
    """The same rows in another order: the same rule, threshold and rates, and the same
    scores of queries (with keys, paths as the index gives them, or without: by content)."""
    X, labels = clusters(n_classes, per_class, d=5, spread=0.3, seed=seed)
    labels = np.array(labels, dtype=object)
    rng = np.random.default_rng(seed)
    keys = None
    if with_keys:
        keys = np.array([f"/b/{k:x}.jpg" for k in rng.integers(0, 2**62, size=len(X))])
    if duplicates:  # rows sharing a key (one path twice), or equal rows without keys
        X[1], labels[1] = X[0], labels[0]
        if keys is not None:
            keys[2] = keys[0]
    perm = rng.permutation(len(X))
    pk = None if keys is None else keys[perm]
    a = openset.calibrate(X, labels, seed=3, keys=keys)
    b = openset.calibrate(X[perm], labels[perm], seed=3, keys=pk)
    assert a == b
    Q = rng.normal(size=(6, 5)) * 10
    sa = openset.OpenSet(a, X, labels, keys).accept(Q)
    sb = openset.OpenSet(b, X[perm], labels[perm], pk).accept(Q)
    for u, v in zip(sa, sb):
        assert np.array_equal(u, v)


def test_canonical_order_is_by_key_then_label_then_vector():
    X = np.array([[2.0, 0.0], [1.0, 5.0], [1.0, 4.0], [0.0, 9.0]])
    labels = ["b", "b", "b", "a"]
    assert openset.canonical_order(X, labels).tolist() == [3, 2, 1, 0]
    keys = np.array([7, 3, 3, 9], dtype=np.uint64)
    assert openset.canonical_order(X, labels, keys).tolist() == [2, 1, 0, 3]


def test_calibrate_is_deterministic_and_scores_directions():
    X, labels = clusters(8, 15)
    a = openset.calibrate(X, labels, seed=7)
    assert a == openset.calibrate(X, labels, seed=7)
    # Powers of two scale exactly: the normalised rows, hence the scores, are bit-identical;
    # only the range guard (a norm) scales.
    b = openset.calibrate(X * 2.0**-5, labels, seed=7)
    assert b.pop("range_limit") == a.pop("range_limit") * 2.0**-5
    assert a == b
    assert a["calibrated"] and a["rule"] in openset.RULES
    assert set(a["candidates"]) == set(openset.RULES)


def test_calibrate_separates_well_separated_classes():
    X, labels = clusters(10, 20, spread=0.02)
    rule = openset.calibrate(X, labels, seed=0)
    assert rule["known_accepted"] >= openset.TPR
    assert rule["unknown_rejected"] == 1.0 and rule["auroc"] == 1.0
    assert rule["repeats"] == openset.REPEATS and rule["held_out_classes_per_repeat"] == 2
    # Applied: the rows themselves are accepted, a direction no class is near is not.
    model = openset.OpenSet(rule, X, labels)
    accepted, _, in_range = model.accept(X[::7])
    assert in_range.all()
    assert accepted.all()
    rng = np.random.default_rng(5)
    far = rng.normal(size=(50, X.shape[1]))
    far_ok, _, _ = model.accept(far)
    assert far_ok.mean() < 0.2


def test_the_range_guard_refuses_what_lies_beyond_the_collection():
    X, labels = clusters(6, 20, spread=0.02)
    rule = openset.calibrate(X, labels)
    limit = rule["range_limit"]
    norms = openset.row_norms(X)
    assert limit == pytest.approx(openset.RANGE_FACTOR * np.quantile(norms, 0.99))
    model = openset.OpenSet(rule, X, labels)
    # The direction of a known row, three times as far as the farthest row: refused.
    far = X[:5] / norms[:5, None] * 3 * norms.max()
    accepted, score, in_range = model.accept(far)
    assert not in_range.any() and not accepted.any()
    assert np.all(score <= rule["threshold"])  # the score alone would have said yes


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=1), st.floats(-300, 300))
def test_row_norms_without_overflow(X, log2):
    Y = X * 2.0 ** int(log2)
    # hypot is the reference that neither under- nor overflows (np.linalg.norm does).  Among
    # subnormals the spacing is absolute (5e-324) and each of hypot.reduce's steps rounds to
    # it: [5e-324] * 3 has norm 8.7e-324, row_norms says 1e-323, hypot.reduce 5e-324.
    tiny = Y.shape[1] * np.finfo(np.float64).smallest_subnormal
    np.testing.assert_allclose(
        openset.row_norms(Y), np.hypot.reduce(Y, axis=1), rtol=1e-12, atol=tiny
    )


def test_one_class_falls_back_and_says_so():
    X, labels = clusters(1, 30)
    rule = openset.calibrate(X, labels)
    assert rule["calibrated"] is False and "1 class" in rule["reason"]
    assert rule["rule"] == "knn1" and rule["threshold"] > 0 and "fallback" in rule
    assert rule["known_accepted"] >= openset.TPR
    few = openset.calibrate(X[:6], labels[:6])
    assert few["calibrated"] is False
    other, other_labels = clusters(2, 5)
    assert "fewer than" in openset.calibrate(other, other_labels)["reason"]


def test_a_single_photo_matches_nothing():
    rule = openset.calibrate(np.ones((1, 4)), ["Kiwi"])
    assert rule["threshold"] is None and rule["calibrated"] is False
    accepted, _, _ = openset.OpenSet(rule, np.ones((1, 4)), ["Kiwi"]).accept(np.ones((3, 4)))
    assert not accepted.any()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="labels"):
        openset.calibrate(np.ones((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="unknown open-set rule"):
        openset.scores("nope", np.ones((1, 2)), np.array([["a", "b"]], dtype=object))
