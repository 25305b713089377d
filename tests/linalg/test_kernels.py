"""Property-based tests of the pure numpy kernels (no Spark: milliseconds)."""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from linalg.kernels import (
    BlockMoments,
    block_moments,
    choose_k,
    correlation_from_covariance,
    covariance,
    eigh_descending,
    fit_pca_from_moments,
    flip_signs,
    merge_moments,
    pca_answer_problems,
    project,
)

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
SMALL = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, width=64)


def standardize(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The reference standardisation: ``(X - mean) / std``, 0 for constant columns."""
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, (np.asarray(X, dtype=np.float64) - mean) / safe, 0.0)


@st.composite
def blocks(draw, min_blocks=1, max_blocks=5, allow_empty=True):
    """A list of blocks with the same number of columns (some possibly empty)."""
    d = draw(st.integers(1, 6))
    n_blocks = draw(st.integers(min_blocks, max_blocks))
    out = []
    for _ in range(n_blocks):
        n = draw(st.integers(0 if allow_empty else 1, 8))
        out.append(draw(arrays(np.float64, (n, d), elements=FLOATS)))
    return out


def assert_moments_close(a: BlockMoments, b: BlockMoments, rtol=1e-10):
    assert a.n == b.n
    scale = max(1.0, float(np.abs(b.m2).max(initial=0.0)))
    np.testing.assert_allclose(
        a.mean, b.mean, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b.mean).max(initial=0)))
    )
    np.testing.assert_allclose(a.m2, b.m2, rtol=rtol, atol=rtol * scale)


@settings(max_examples=60, deadline=None)
@given(blocks(min_blocks=2))
def test_merge_equals_numpy_cov_of_concatenation(bs):
    X = np.concatenate(bs)
    merged = reduce(merge_moments, map(block_moments, bs))
    assert merged.n == X.shape[0]
    if X.shape[0] >= 2:
        expected = np.atleast_2d(np.cov(X, rowvar=False))
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(covariance(merged), expected, rtol=1e-10, atol=1e-10 * scale)
        np.testing.assert_allclose(merged.mean, X.mean(axis=0), rtol=1e-10, atol=1e-10 * 1e3)


@settings(max_examples=60, deadline=None)
@given(blocks(min_blocks=3, max_blocks=3), st.permutations([0, 1, 2]))
def test_merge_is_associative_and_order_free(bs, order):
    a, b, c = map(block_moments, bs)
    left = merge_moments(merge_moments(a, b), c)
    right = merge_moments(a, merge_moments(b, c))
    parts = [a, b, c]
    shuffled = reduce(merge_moments, [parts[i] for i in order])
    assert_moments_close(left, right)
    assert_moments_close(shuffled, left)


@settings(max_examples=40, deadline=None)
@given(blocks(min_blocks=1, max_blocks=3, allow_empty=False))
def test_empty_blocks_are_identities(bs):
    d = bs[0].shape[1]
    m = block_moments(np.concatenate(bs))
    empty = block_moments(np.zeros((0, d)))
    assert empty.n == 0
    for merged in (merge_moments(empty, m), merge_moments(m, empty)):
        assert merged.n == m.n
        np.testing.assert_array_equal(merged.mean, m.mean)
        np.testing.assert_array_equal(merged.m2, m.m2)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(3, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_covariance_exact_under_large_shift(d, n, n_blocks, seed):
    # SPARK-26158-style data: values near 1e6 differing by ~1e-3. E[XY]-E[X]E[Y] on raw
    # sums loses every digit here; the centred merge must not.
    rng = np.random.default_rng(seed)
    spread = rng.standard_normal((n, d)) * 1e-3
    X = 1e6 + spread
    cuts = np.sort(rng.integers(0, n + 1, n_blocks - 1))
    merged = reduce(merge_moments, map(block_moments, np.split(X, cuts)))
    expected = np.cov(spread, rowvar=False)  # exact reference: the shift removed
    np.testing.assert_allclose(covariance(merged), np.atleast_2d(expected), rtol=1e-6, atol=1e-12)


def test_naive_formula_fails_where_ours_holds():
    # Pins why we centre per block: the raw-moment formula is wrong by orders of magnitude.
    rng = np.random.default_rng(0)
    X = 1e6 + rng.standard_normal((1000, 2)) * 1e-3
    n = X.shape[0]
    naive = (X.T @ X - n * np.outer(X.mean(0), X.mean(0))) / (n - 1)
    ours = covariance(block_moments(X))
    ref = np.cov(X - 1e6, rowvar=False)
    assert np.abs(naive - ref).max() > 100 * np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 30), st.integers(1, 8)), elements=FLOATS))
def test_eigh_descending_signs_deterministic(X):
    S = np.atleast_2d(np.cov(X, rowvar=False))
    w, V = eigh_descending(S)
    assert np.all(np.diff(w) <= 1e-9 * max(1.0, abs(w[0])))
    idx = np.argmax(np.abs(V), axis=0)
    assert np.all(V[idx, np.arange(V.shape[1])] > 0)
    np.testing.assert_allclose(S @ V, V * w, atol=1e-8 * max(1.0, float(np.abs(S).max())))
    # Flip the signs of some input coordinates: S2 = D S D has eigenvectors D V, which
    # LAPACK may return with any column signs; ours must come back as flip_signs(D V).
    # Only where the eigenvector is unique (separated eigenvalue) and its largest
    # entry is unambiguous is that a property.
    d = np.where(np.arange(S.shape[0]) % 2 == 0, -1.0, 1.0)
    w2, V2 = eigh_descending(S * np.outer(d, d))
    scale = max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(w2, w, atol=1e-9 * scale)
    expected = flip_signs(d[:, None] * V)
    gaps = np.minimum(np.abs(np.diff(w, prepend=np.inf)), np.abs(np.diff(w, append=-np.inf)))
    top2 = np.sort(np.abs(V), axis=0)[-2:] if V.shape[0] > 1 else np.array([[0.0], [1.0]])
    clear = (gaps > 1e-6 * scale) & (top2[1] - top2[0] > 1e-6)
    np.testing.assert_allclose(V2[:, clear], expected[:, clear], atol=1e-6)


def test_eigh_sign_flip_is_deterministic_on_negated_vectors():
    rng = np.random.default_rng(1)
    V = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    np.testing.assert_array_equal(flip_signs(V), flip_signs(-V))


def test_zero_std_columns_map_to_zero_not_nan():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((20, 4))
    X[:, 1] = 0.0  # all-zero column: normal for MobileNetV2 features on small samples
    X[:, 3] = 5.0  # constant column
    corr, std = correlation_from_covariance(covariance(block_moments(X)))
    assert std[1] == 0 and std[3] == 0
    assert np.isfinite(corr).all()
    assert np.all(corr[1] == 0) and np.all(corr[:, 3] == 0)
    Z = standardize(X, X.mean(0), std)
    assert np.all(Z[:, 1] == 0) and np.all(Z[:, 3] == 0)
    fit = fit_pca_from_moments(block_moments(X), k=2)
    assert np.isfinite(fit.transform(X)).all()
    assert fit.explained_variance_ratio.sum() == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(3, 30), st.integers(2, 6)), elements=FLOATS), st.data()
)
def test_pca_fit_matches_numpy_reference(X, data):
    d = X.shape[1]
    # A column whose spread is at float64 resolution of its magnitude (1000 vs
    # 1000 - 1e-13) has a correlation made of rounding noise in any implementation:
    # the property holds for exactly constant or resolvable columns.
    spread = np.ptp(X, axis=0)
    assume(np.all((spread == 0) | (spread > 1e-6 * (1.0 + np.abs(X).max(axis=0)))))
    k = data.draw(st.integers(1, d))
    fit = fit_pca_from_moments(block_moments(X), k=k)
    std = np.where(np.ptp(X, axis=0) == 0, 0.0, X.std(axis=0, ddof=1))
    Z = np.where(std > 0, (X - X.mean(0)) / np.where(std > 0, std, 1), 0.0)
    C = np.cov(Z, rowvar=False)
    w = np.sort(np.linalg.eigvalsh(C))[::-1]
    np.testing.assert_allclose(fit.eigenvalues, w, atol=1e-9 * max(1.0, abs(w[0])))
    P = fit.transform(X)
    # The projection's covariance is diag(top-k eigenvalues).
    np.testing.assert_allclose(
        np.atleast_2d(np.cov(P, rowvar=False)),
        np.diag(fit.eigenvalues[:k]),
        atol=1e-8 * max(1.0, abs(w[0])),
    )


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 20), elements=st.floats(0, 1)), st.floats(1e-6, 1.0))
def test_choose_k_is_the_smallest_reaching_the_share(raw, share):
    ratio = np.sort(raw)[::-1]
    ratio = ratio / ratio.sum() if ratio.sum() > 0 else np.full_like(ratio, 1 / len(ratio))
    k = choose_k(ratio, variance=share)
    cum = np.cumsum(ratio)
    assert cum[k - 1] >= share - 1e-12 or k == len(ratio)
    if k > 1:
        assert cum[k - 2] < share - 1e-12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k=0 must be between 1 and n_features=3"),
        ({"k": 4}, r"k=4 must be between 1 and n_features=3"),
        ({"variance": 0.0}, r"variance=0.0 must be in \(0, 1\]"),
        ({"variance": 1.5}, r"variance=1.5 must be in \(0, 1\]"),
        ({}, r"exactly one of k and variance"),
    ],
)
def test_choose_k_rejects_bad_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_k(np.array([0.5, 0.3, 0.2]), **kwargs)


def test_covariance_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        covariance(block_moments(np.ones((1, 3))))


def test_merge_refuses_mixed_widths():
    with pytest.raises(ValueError, match="same length"):
        merge_moments(block_moments(np.ones((2, 3))), block_moments(np.ones((2, 4))))


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 10), st.integers(1, 5)), elements=SMALL),
    st.sampled_from([1e3, 1e6, -1e6]),
)
def test_project_is_exact_under_a_large_shift_of_the_data_and_mean(X, shift):
    # Subtracting the mean before the product keeps the projection exact when the mean
    # is large against the spread; folding it into an offset (X @ W - mean @ W) would
    # lose the spread to cancellation.
    rng = np.random.default_rng(0)
    W = rng.standard_normal((X.shape[1], 2))
    mean = X.mean(axis=0)
    ref = project(X, W, mean)
    shifted = project(X + shift, W, mean + shift)
    # X + shift is rounded to ulp(shift); that error, carried by W, is the bound.
    bound = 4 * np.spacing(abs(shift)) * np.abs(W).sum(axis=0)
    assert np.all(np.abs(shifted - ref) <= bound)


def test_folding_the_mean_into_an_offset_fails_where_project_holds():
    rng = np.random.default_rng(3)
    X = 1e9 + rng.standard_normal((200, 50)) * 1e-4
    W = rng.standard_normal((50, 2))
    mean = X.mean(axis=0)
    exact = (X - 1e9 - (mean - 1e9)) @ W  # the spread, computed without the offset
    folded = X @ W - mean @ W
    ours = project(X, W, mean)
    scale = np.abs(exact).max()
    assert np.abs(folded - exact).max() > 1e-4 * scale
    np.testing.assert_allclose(ours, exact, atol=1e-6 * scale)


def test_constant_column_whose_mean_rounds_has_zero_std():
    # Regression (found by hypothesis): 30 copies of 41.08326037 have a float mean
    # that differs in the last bit, which made a tiny nonzero std and a spurious
    # correlation of 1 between two constant columns (eigenvalue 2 instead of 0).
    X = np.full((30, 2), 41.08326037)
    fit = fit_pca_from_moments(block_moments(X), k=1)
    np.testing.assert_array_equal(fit.std, [0.0, 0.0])
    np.testing.assert_array_equal(fit.eigenvalues, [0.0, 0.0])


# ------------------------------------------------- checking someone else's PCA answer


def _answer(X: np.ndarray, k: int):
    """A correct PCA answer on standardised X: components, ratios, projected variances."""
    fit = fit_pca_from_moments(block_moments(X), k=k)
    Z = standardize(X, fit.mean, fit.std)
    V = fit.components
    total = float(np.count_nonzero(fit.std > 0))
    return V, fit.explained_variance_ratio[:k], (Z @ V).var(axis=0, ddof=1), total, Z


def _data(seed: int, n: int, d: int, factor: float) -> np.ndarray:
    """Columns of mixed scales and offsets sharing one common factor (weight ``factor``)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) + factor * rng.standard_normal((n, 1))
    return X * 10.0 ** rng.uniform(-2, 2, d) + rng.uniform(-1e3, 1e3, d)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(3, 25),
    st.integers(2, 8),
    st.integers(1, 8),
    st.floats(0, 3),
)
def test_a_correct_pca_answer_has_no_problems(seed, n, d, k, factor):
    k = min(k, d)
    V, ratio, var, total, _ = _answer(_data(seed, n, d, factor), k)
    assert pca_answer_problems(V, ratio, var, total) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(8, 25), st.integers(3, 8))
def test_wrong_vectors_or_wrong_ratios_are_caught(seed, n, d):
    V, ratio, var, total, Z = _answer(_data(seed, n, d, factor=3.0), 2)
    # What F2J's dgesdd did: singular values too large (ratios too small, the sum of
    # all of them above the trace) while the vectors stay orthonormal.
    assert any("claims" in p for p in pca_answer_problems(V, ratio / 3, var, total))
    # Orthonormal vectors that are not eigenvectors: turn the first towards the
    # direction of least variance; the data's variance along it no longer matches.
    low = np.linalg.eigh(np.cov(Z, rowvar=False))[1][:, 0]
    low = low - V @ (V.T @ low)
    low /= np.linalg.norm(low)
    R = V.copy()
    R[:, 0] = (V[:, 0] + low) / np.sqrt(2)
    var_r = (Z @ R).var(axis=0, ddof=1)
    assert any("claims" in p for p in pca_answer_problems(R, ratio, var_r, total))
    assert any("orthonormal" in p for p in pca_answer_problems(V * 2, ratio, var, total))
    assert pca_answer_problems(V, ratio * np.nan, var, total) == [
        "its components or explained variances are not finite"
    ]


def test_ratios_summing_above_one_are_caught():
    V = np.eye(3)[:, :2]
    problems = pca_answer_problems(V, np.array([0.7, 0.6]), np.array([2.1, 1.8]), 3.0)
    assert any("sum to 1.3" in p for p in problems)
