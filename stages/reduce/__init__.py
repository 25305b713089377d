"""Stage 2: FEATURES to RESULTS (PCA model, projections, summary, search index).

:func:`reduce_features` is the entry point of the CLI and the Python API: a full fit
(:mod:`stages.reduce.full`) or, with ``update``, the saved statistics updated with the new
runs only (:mod:`stages.reduce.update`).  The estimator API is :class:`PCA` /
:class:`PCAModel` (:mod:`stages.reduce.pca`, :mod:`stages.reduce.pca_model`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from stages.base.errors import UsageError
from stages.base.params import ReduceParams
from stages.reduce.full import reduce_full
from stages.reduce.pca import PCA
from stages.reduce.pca_model import PCAModel
from stages.reduce.update import update_reduce

__all__ = ["reduce_features", "reduce_full", "update_reduce", "PCA", "PCAModel"]


def reduce_features(
    spark,
    features: str,
    results: str,
    params: Optional[ReduceParams] = None,
    featurize_report: Optional[Dict[str, Any]] = None,
    index: bool = True,
    **options: Any,
) -> Dict[str, Any]:
    """Run stage 2 and return the summary written to ``RESULTS/summary.json``.

    Parameters
    ----------
    spark : SparkSession
    features : str
        Features Parquet (stage 1 output).
    results : str
        Output folder or URI.
    params : ReduceParams, optional
        The options of ``fruits-pipeline reduce``: ``k`` components, else the
        smallest k reaching ``variance`` (0.95 when neither is given); ``check``
        ("spark-ml": also fit Spark ML ``StandardScaler + PCA`` and record the
        agreement); ``update`` (:func:`update_reduce`); ``overwrite``.
    featurize_report : dict, optional
        Stage 1's report, kept in the summary by ``fruits-pipeline run``.
    index : bool
        Also build ``RESULTS/index/`` (:func:`stages.reduce.index.build_index`), once
        the projections and the model are committed.
    **options
        Fields of :class:`~stages.base.params.ReduceParams` given one by one:
        ``reduce_features(spark, f, r, k=5)``.

    Raises
    ------
    UsageError
        Bad arguments or features; nothing is written then.
    StepFailed
        The index step failed: RESULTS holds the projections and the model, and the
        message says how to build the index (``fruits-pipeline index RESULTS``).
    """
    params = ReduceParams.of(params, **options)
    if params.update:
        if not index or featurize_report is not None:
            raise UsageError(
                "update=True keeps RESULTS whole: its search index is rebuilt and it "
                "records no featurize report (index=False and featurize_report are for a "
                "full reduce)"
            )
        return update_reduce(spark, features, results, params)
    return reduce_full(spark, features, results, params, featurize_report, index)
