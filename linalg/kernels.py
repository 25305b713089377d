"""Pure numpy kernels for a distributed PCA (no pyspark here).

Every kernel works on one block of rows ``X`` of shape ``(n_samples, n_features)``
and accumulates in float64.  The moments of several blocks merge with the
Chan-Golub-LeVeque update, which is associative and commutative up to rounding,
so Spark may combine partitions in any order and tree shape.

Conventions follow Spark ML so that our results agree with
``StandardScaler(withMean=True, withStd=True)`` followed by ``PCA``:

* the covariance is unbiased (divides by ``n - 1``);
* a column whose standard deviation is zero is standardised to 0, not NaN;
* the PCA is the eigendecomposition of the correlation matrix ``D^-1 C D^-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas

__all__ = [
    "BlockMoments",
    "PCAFit",
    "block_moments",
    "merge_moments",
    "covariance",
    "correlation_from_covariance",
    "eigh_descending",
    "choose_k",
    "fit_pca_from_moments",
    "project",
    "pca_answer_problems",
]


@dataclass(frozen=True)
class BlockMoments:
    """Count, mean and centred cross-product of a set of rows.

    Attributes
    ----------
    n : int
        Number of rows.
    mean : ndarray of shape (n_features,)
        Column means, float64 (zeros when ``n == 0``).
    m2 : ndarray of shape (n_features, n_features)
        ``(X - mean)^T (X - mean)``, float64 (zeros when ``n == 0``).
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def n_features(self) -> int:
        """Number of columns."""
        return int(self.mean.shape[0])

    @classmethod
    def empty(cls, n_features: int) -> BlockMoments:
        """The identity of :func:`merge_moments` for ``n_features`` columns."""
        return cls(0, np.zeros(n_features), np.zeros((n_features, n_features)))


def block_moments(X: np.ndarray) -> BlockMoments:
    """Moments of one block of rows, with one symmetric rank-k update (syrk) in float64.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
        The rows; any real dtype, converted to float64.

    Returns
    -------
    BlockMoments
        ``n = n_samples``; an empty block gives the merge identity.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-d (n_samples, n_features), got shape {X.shape}")
    n, d = X.shape
    if n == 0:
        return BlockMoments.empty(d)
    mean = X.mean(axis=0)
    # A constant column must give exactly zero spread (Spark ML maps it to 0), but
    # sum/n rounds: 41.08326037 * 30 / 30 need not be 41.08326037.  Use the value.
    const = X.max(axis=0) == X.min(axis=0)
    mean[const] = X[0, const]
    # Centre on the block's own mean before the product: E[XY] - E[X]E[Y] on raw
    # sums cancels catastrophically when the mean is large against the spread.
    Xc = X - mean
    # Xc^T Xc with BLAS syrk: the symmetric product costs half a GEMM.
    # (C-ordered Xc is Fortran-ordered Xc.T: this form needs no transposed copy.)
    upper = scipy.linalg.blas.dsyrk(1.0, Xc.T, trans=0)
    m2 = np.triu(upper) + np.triu(upper, 1).T
    return BlockMoments(n, mean, m2)


def merge_moments(a: BlockMoments, b: BlockMoments) -> BlockMoments:
    """Merge the moments of two disjoint sets of rows (Chan, Golub and LeVeque).

    ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n`` with ``delta = mean_b - mean_a``.
    An empty side is an exact identity.

    Parameters
    ----------
    a, b : BlockMoments
        Moments over the same number of features.

    Returns
    -------
    BlockMoments
    """
    if a.n_features != b.n_features:
        raise ValueError(
            f"cannot merge moments of {a.n_features} and {b.n_features} features: "
            "all feature vectors must have the same length"
        )
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.n * b.n / n)
    return BlockMoments(n, mean, m2)


def covariance(moments: BlockMoments) -> np.ndarray:
    """Unbiased covariance ``M2 / (n - 1)`` of shape (n_features, n_features).

    Raises
    ------
    ValueError
        With fewer than 2 rows.
    """
    if moments.n < 2:
        raise ValueError(f"a covariance needs at least 2 rows, got n_samples={moments.n}")
    return moments.m2 / (moments.n - 1)


def correlation_from_covariance(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correlation matrix ``D^-1 C D^-1`` and the standard deviations ``D``.

    A column with zero standard deviation gets a zero row and column (Spark ML's
    ``StandardScaler`` maps such a column to 0), never NaN.

    Parameters
    ----------
    cov : ndarray of shape (n_features, n_features)

    Returns
    -------
    corr : ndarray of shape (n_features, n_features)
    std : ndarray of shape (n_features,)
    """
    var = np.clip(np.diag(cov), 0.0, None)
    std = np.sqrt(var)
    inv = np.zeros_like(std)
    nz = std > 0
    inv[nz] = 1.0 / std[nz]
    corr = cov * np.outer(inv, inv)
    corr = (corr + corr.T) / 2.0  # exact symmetry for eigh
    return corr, std


def eigh_descending(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric matrix, largest first, with deterministic signs.

    The sign of each eigenvector is fixed so that its entry of largest absolute
    value is positive (ties go to the first such entry), as scikit-learn's
    ``svd_flip`` does for its components.

    Parameters
    ----------
    S : ndarray of shape (n_features, n_features)

    Returns
    -------
    eigenvalues : ndarray of shape (n_features,)
        Descending.
    eigenvectors : ndarray of shape (n_features, n_features)
        Column ``j`` belongs to ``eigenvalues[j]``.
    """
    w, V = scipy.linalg.eigh(np.asarray(S, dtype=np.float64))
    order = np.argsort(w)[::-1]
    w = w[order]
    V = V[:, order]
    return w, flip_signs(V)


def flip_signs(V: np.ndarray) -> np.ndarray:
    """Return ``V`` with each column's largest-|x| entry made positive."""
    idx = np.argmax(np.abs(V), axis=0)
    signs = np.sign(V[idx, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs


def choose_k(
    explained_variance_ratio: np.ndarray,
    k: int | None = None,
    variance: float | None = None,
) -> int:
    """Number of components from a count or from a share of the variance.

    Parameters
    ----------
    explained_variance_ratio : ndarray of shape (n_features,)
        Descending ratios summing to 1 (or 0 for a constant data set).
    k : int, optional
        Requested count, ``1 <= k <= n_features``.
    variance : float, optional
        Requested share in ``(0, 1]``: the smallest k whose cumulative ratio
        reaches it.

    Returns
    -------
    int
    """
    d = int(explained_variance_ratio.shape[0])
    if (k is None) == (variance is None):
        raise ValueError("give exactly one of k and variance")
    if k is not None:
        if not 1 <= k <= d:
            raise ValueError(f"k={k} must be between 1 and n_features={d}")
        return int(k)
    assert variance is not None
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance={variance} must be in (0, 1]")
    cum = np.cumsum(explained_variance_ratio)
    # Rounding may leave the total a hair under 1: compare with a tolerance.
    hit = np.nonzero(cum >= variance - 1e-12)[0]
    return int(hit[0] + 1) if hit.size else d


@dataclass(frozen=True)
class PCAFit:
    """A fitted standardise-then-PCA model.

    Attributes
    ----------
    n_samples : int
    mean : ndarray of shape (n_features,)
    std : ndarray of shape (n_features,)
        Unbiased standard deviations; 0 for constant columns.
    components : ndarray of shape (n_features, n_components)
        Unit eigenvectors of the correlation matrix, columns in descending order.
    eigenvalues : ndarray of shape (n_features,)
        All eigenvalues of the correlation matrix, descending.
    explained_variance_ratio : ndarray of shape (n_features,)
        ``eigenvalues / trace``.
    """

    n_samples: int
    mean: np.ndarray
    std: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        """Number of kept components ``k``."""
        return int(self.components.shape[1])

    @property
    def n_features(self) -> int:
        """Number of input features ``d``."""
        return int(self.mean.shape[0])

    def projection_matrix(self) -> np.ndarray:
        """``W`` of shape (n_features, n_components) with ``transform(X) = (X - mean) @ W``.

        Folds the division by ``std`` into the components: ``W = diag(1/std) V``,
        with zero rows for constant columns (Spark ML maps them to 0).
        """
        inv = np.zeros_like(self.std)
        nz = self.std > 0
        inv[nz] = 1.0 / self.std[nz]
        return self.components * inv[:, None]

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project rows ``X`` (n_samples, n_features) to (n_samples, n_components)."""
        return project(X, self.projection_matrix(), self.mean)


def fit_pca_from_moments(
    moments: BlockMoments, k: int | None = None, variance: float | None = None
) -> PCAFit:
    """Standardise-then-PCA from merged moments: eigendecomposition of the correlation.

    Parameters
    ----------
    moments : BlockMoments
        Moments of all rows (at least 2).
    k, variance
        See :func:`choose_k`; exactly one is given.

    Returns
    -------
    PCAFit
    """
    cov = covariance(moments)
    corr, std = correlation_from_covariance(cov)
    w, V = eigh_descending(corr)
    w = np.where(np.abs(w) < 1e-13 * max(1.0, float(np.abs(w).max(initial=0.0))), 0.0, w)
    trace = float(np.trace(corr))
    ratio = w / trace if trace > 0 else np.zeros_like(w)
    n_components = choose_k(ratio, k=k, variance=variance)
    return PCAFit(
        n_samples=moments.n,
        mean=moments.mean,
        std=std,
        components=V[:, :n_components],
        eigenvalues=w,
        explained_variance_ratio=ratio,
    )


def project(X: np.ndarray, W: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """``(X - mean) @ W`` in float64: one GEMM per block.

    The mean is subtracted before the product (not folded into an offset
    ``mean @ W``), which would cancel when the mean is large against the spread.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
    W : ndarray of shape (n_features, n_components)
    mean : ndarray of shape (n_features,), optional

    Returns
    -------
    ndarray of shape (n_samples, n_components)
    """
    X = np.asarray(X, dtype=np.float64)
    if mean is not None:
        X = X - mean
    return X @ W


def pca_answer_problems(
    components: np.ndarray,
    explained_variance_ratio: np.ndarray,
    projected_variance: np.ndarray,
    total_variance: float,
    rtol: float = 1e-6,
) -> list[str]:
    """What is wrong with a PCA answer given by someone else (Spark ML), if anything.

    A valid answer has orthonormal components, ratios in [0, 1] summing to at most 1,
    and each ratio equal to the variance the data actually has along its component,
    over the total variance.  That last test needs only the answer and the data, so
    it catches an SVD that returned wrong vectors or wrong singular values without
    trusting any other PCA.

    Parameters
    ----------
    components : ndarray of shape (n_features, k)
    explained_variance_ratio : ndarray of shape (k,)
    projected_variance : ndarray of shape (k,)
        Sample variance (ddof=1) of the data projected on each component.
    total_variance : float
        Trace of the data's covariance (the number of non-constant columns for
        standardised data).
    rtol : float
        Relative tolerance of the ratio-versus-variance test.

    Returns
    -------
    list of str
        One sentence per problem; empty when the answer is valid.
    """
    V = np.asarray(components, dtype=np.float64)
    ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
    var = np.asarray(projected_variance, dtype=np.float64)
    problems: list[str] = []
    if not (np.isfinite(V).all() and np.isfinite(ratio).all()):
        return ["its components or explained variances are not finite"]
    gram_err = float(np.abs(V.T @ V - np.eye(V.shape[1])).max()) if V.size else 0.0
    if gram_err > 1e-8:
        problems.append(f"its components are not orthonormal (max |V'V - I| = {gram_err:.2g})")
    if (ratio < -1e-12).any() or (ratio > 1 + 1e-9).any() or ratio.sum() > 1 + 1e-9:
        problems.append(f"its explained variances sum to {ratio.sum():.6g} (at most 1 is possible)")
    claimed = ratio * float(total_variance)
    scale = max(float(np.abs(var).max(initial=0.0)), 1e-12 * float(total_variance), 1e-300)
    rel = np.abs(claimed - var) / scale
    if rel.size and float(rel.max()) > rtol:
        i = int(np.argmax(rel))
        problems.append(
            f"component {i + 1} claims {ratio[i]:.4g} of the variance but the data has "
            f"{var[i] / float(total_variance):.4g} along it"
        )
    return problems
