"""The reduce stage's PCA as an estimator: ``PCA(k=..., variance=...).fit(features)``.

As in Spark ML and scikit-learn, the estimator holds the parameters and ``fit``
returns a fitted :class:`stages.reduce.pca_model.PCAModel` (``mean_``, ``scale_``,
``components_``, ``explained_variance_ratio_``, ``transform``, ``save``/``load``).
The fit standardises every column (Spark ML's ``StandardScaler(withMean=True,
withStd=True)``) and eigendecomposes the correlation matrix:

1. one ``treeAggregate`` over the usable rows collects count, mean and centred
   cross-product in float64 (:meth:`linalg.distributed.RowMatrix.compute_moments`);
2. :meth:`PCA.fit_moments` turns those moments into the model on the driver
   (:func:`linalg.kernels.fit_pca_from_moments`: one ``eigh`` of the d x d
   correlation).  It is the only way moments become components: ``reduce`` and
   ``reduce --update`` (merged moments) both end there.

>>> from stages.reduce.pca import PCA
>>> model = PCA(k=8).fit("out/Features")                   # doctest: +SKIP
>>> model.components_.shape, model.explained_variance_ratio_.sum()   # doctest: +SKIP
((8, 1280), 0.62...)
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import numpy as np

from linalg.kernels import BlockMoments, fit_pca_from_moments
from stages.base.errors import UsageError
from stages.base.params import ReduceParams
from stages.reduce.feature_matrix import OpenedFeatures, feature_file_keys, open_features
from stages.reduce.pca_model import PCAModel

__all__ = ["PCA"]


class PCA:
    """Standardise-then-PCA over features, fitted on Spark.

    Parameters
    ----------
    k : int, optional
        Number of components, ``1 <= k <=`` the feature length (and the rank).
    variance : float, optional
        Share of the variance in ``(0, 1]``: the smallest k reaching it.  The
        default when neither is given: 0.95.

    Raises
    ------
    UsageError
        Bad ``k`` / ``variance`` (checked here, before any Spark job, by
        :class:`stages.base.params.ReduceParams`: the CLI's rules and messages).
    """

    def __init__(self, k: Optional[int] = None, variance: Optional[float] = None):
        params = ReduceParams(k=k, variance=variance)
        self.k, self.variance = params.k, params.target_variance

    def __repr__(self) -> str:
        return f"PCA(k={self.k!r}, variance={self.variance!r})"

    @property
    def requested(self) -> Dict[str, Any]:
        """``{"k": ..., "variance": ...}`` as recorded in the summary and the model."""
        return {"k": self.k, "variance": self.variance}

    def fit(self, features, spark=None) -> PCAModel:
        """Fit on features: one pass over their usable rows, then one ``eigh``.

        Parameters
        ----------
        features : str, DataFrame or stages.reduce.feature_matrix.OpenedFeatures
            A features Parquet path or URI (stage 1's output; read with ``spark``,
            default the active session), a DataFrame with its columns ``path,
            label, features, error``, or features already opened (``reduce``
            keeps them cached to project them after).  Error rows are skipped.
        spark : SparkSession, optional

        Returns
        -------
        PCAModel
            With ``statistics`` (``rows_total``, ``error_rows``, ``requested``; and
            ``files`` for a path) and ``timings`` (seconds of ``moments`` and ``eigh``).

        Raises
        ------
        UsageError
            Bad features (missing, wrong schema, mixed models or lengths, NaN,
            fewer than 2 usable rows), or ``k`` above their length or rank.
        """

        if isinstance(features, OpenedFeatures):
            return self._fit_opened(features)
        with open_features(features, spark, persist=False) as opened:
            return self._fit_opened(opened)

    def _fit_opened(self, opened) -> PCAModel:
        t0 = time.perf_counter()
        name, info = opened.name, opened.info
        d = info["n_features"]
        self._check_k(d)
        # The one pass over the data: count, mean, centred cross-product (treeAggregate).
        moments = opened.matrix.compute_moments(d)
        lengths = sorted(info["lengths"].value | {d})
        if len(lengths) > 1:
            raise UsageError(
                f"features {name} mix vectors of lengths {', '.join(map(str, lengths))}: "
                "every vector must come from the same model; featurize again"
            )
        if not (np.isfinite(moments.mean).all() and np.isfinite(moments.m2).all()):
            raise UsageError(
                f"features {name} hold NaN or infinite values in rows without an error: "
                "they were not written by `fruits-pipeline featurize`; featurize again"
            )
        info["rows"] = moments.n
        info["error_rows"] = info["rows_total"] - moments.n
        if moments.n < 2:
            raise UsageError(
                f"features {name} have {moments.n} usable rows "
                f"({info['error_rows']} error rows): a PCA needs at least 2; featurize more images"
            )
        t_moments = time.perf_counter()
        statistics: Dict[str, Any] = {}
        if opened.is_path:
            keys = feature_file_keys(opened.spark, name, info["file_uris"])
            statistics["files"] = sorted(keys)
        statistics.update(
            {
                "rows_total": info["rows_total"],
                "error_rows": info["error_rows"],
                "requested": self.requested,
            }
        )
        model = self.fit_moments(moments, info["features_model"], statistics)
        timings = {"moments": t_moments - t0, "eigh": time.perf_counter() - t_moments}
        return model.with_timings(timings)

    def _check_k(self, d: int) -> None:
        if self.k is not None and self.k > d:
            raise UsageError(f"--k {self.k} must be between 1 and the feature length {d}")

    def fit_moments(
        self,
        moments: BlockMoments,
        features_model: Optional[Dict[str, Any]] = None,
        statistics: Optional[Dict[str, Any]] = None,
    ) -> PCAModel:
        """The model of rows with these moments (no Spark): one float64 ``eigh``.

        Parameters
        ----------
        moments : BlockMoments
            Count (at least 2), mean and centred cross-product of the rows, e.g.
            merged from several passes (:func:`linalg.kernels.merge_moments`).
        features_model : dict, optional
            What made the features (kept in the model).
        statistics : dict, optional
            What the moments cover (kept in the model; ``reduce --update`` reads
            ``files``).

        Returns
        -------
        PCAModel
            Keeps ``moments.m2``, so the fit can be updated with more rows.

        Raises
        ------
        UsageError
            ``k`` above the feature length or the rank of the moments.
        ValueError
            Fewer than 2 rows.
        """
        d = moments.n_features
        self._check_k(d)
        fit = fit_pca_from_moments(moments, k=self.k, variance=self.variance)
        nonconstant = int(np.count_nonzero(fit.std > 0))
        rank = min(moments.n - 1, nonconstant)
        if self.k is not None and self.k > rank:
            raise UsageError(
                f"--k {self.k} is above the rank {rank} of these features ({moments.n} rows, "
                f"{nonconstant} non-constant columns): components past "
                f"{rank} carry no variance; use --k {rank} or less, or --variance"
            )
        return PCAModel(fit, features_model or {}, m2=moments.m2, statistics=statistics or {})
