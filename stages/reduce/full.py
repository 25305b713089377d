"""Stage 2, reduce: features Parquet to a standardise-then-PCA projection (``Results/``).

Runs as ``fruits-pipeline reduce FEATURES RESULTS`` or, as an EMR step does,
``spark-submit stages/steps/reduce.py FEATURES RESULTS``.

Plumbing over the estimator :class:`stages.reduce.pca.PCA`; data flow (the features are
read once):

1. :func:`stages.reduce.feature_matrix.open_features` turns the features into an RDD of
   Arrow record batches (persisted in the JVM, no Python object per row); each
   batch becomes one :class:`linalg.distributed.KeyedBlock` (float32 rows, with
   ``path`` and ``label`` kept as Arrow arrays).  Error rows are dropped there and
   counted.
2. ``PCA.fit``: one ``treeAggregate`` (``KeyedRowMatrix.compute_moments``) collects
   count, mean and centred cross-product in float64; the driver eigendecomposes
   the correlation matrix (d x d) with :func:`linalg.kernels.fit_pca_from_moments`.
3. The fitted :class:`stages.reduce.pca_model.PCAModel` broadcasts the projection (d x k)
   and the mean (``PCAModel.project_matrix``); each block is projected with one
   GEMM, turned back into an Arrow batch and written to Parquet
   (:func:`stages.reduce.feature_matrix.write_projections`).

``RESULTS/`` gets ``projections/`` (``path, label, pca array<double>[k]``),
``pca_model/`` (see :mod:`stages.reduce.pca_model`) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from stages.base.params import ReduceParams
from stages.base.progress import Progress
from stages.reduce.feature_matrix import (
    PROJECTIONS_SCHEMA,
    open_features,
    write_projections,
)
from stages.reduce.index import index_step
from stages.reduce.pca import PCA
from stages.reduce.pca_model import PCAModel
from stages.reduce.sparkml import spark_ml_check
from stages.storage import hadoopfs
from stages.storage.layout import Results
from stages.storage.outputs import atomic_output, check_disjoint

logger = logging.getLogger(__name__)

__all__ = ["reduce_full", "fit_summary", "PROJECTIONS_SCHEMA"]


def reduce_full(
    spark,
    features: str,
    results: str,
    params: ReduceParams,
    featurize_report: Optional[Dict[str, Any]] = None,
    index: bool = True,
) -> Dict[str, Any]:
    """A full reduce: fit the PCA on all of ``features`` and write a new ``results``.

    The entry point is :func:`stages.reduce.reduce_features` (it also dispatches
    ``update``); ``params.update`` is ignored here.  The index is built once the
    projections and the model are committed (:func:`stages.reduce.index.index_step`): a
    failed index step raises :class:`~stages.base.errors.StepFailed` and keeps them.
    """
    pca = PCA(k=params.k, variance=params.variance)
    check, overwrite = params.check, params.overwrite
    check_disjoint([("RESULTS", results, "FEATURES", features)])
    with atomic_output(spark, results, overwrite) as target, Progress(spark, "reduce", None):
        summary = _reduce(spark, features, results, target, pca, check, featurize_report)
    # Committed: whatever happens to the index now, the PCA's work is kept.
    if index:
        index_step(spark, results, summary)
    times = summary["timings_s"]
    took = f"{times['reduce_total']:.1f} s"
    if "index" in times:
        total = times["reduce_total"] + times["index"]
        took = f"{total:.1f} s ({times['index']:.1f} s of it the index)"
    logger.info(f"reduce: wrote {results} in {took}")
    return summary


def fit_summary(
    features: str,
    results: str,
    model: PCAModel,
    rows: int,
    error_rows: int,
    requested: Dict[str, Any],
    stamps: Tuple[float, float, float, float],
) -> Dict[str, Any]:
    """The fit's part of ``summary.json`` (``reduce`` and ``reduce --update``).

    ``stamps``: ``perf_counter`` at the start, after the statistics, after the
    eigendecomposition and after the writes.
    """
    t0, t_read, t_fit, t_write = stamps
    ratio = model.explained_variance_ratio_
    return {
        "features": features,
        "results": results,
        "rows": rows,
        "error_rows": error_rows,
        "n_features": model.n_features_in_,
        "k": model.n_components_,
        "requested": requested,
        "cumulative_explained_variance": float(np.sum(ratio)),
        "explained_variance_ratio": ratio.tolist(),
        "features_model": model.features_model,
        "timings_s": {
            "read_and_statistics": t_read - t0,
            "eigh": t_fit - t_read,
            "project_and_write": t_write - t_fit,
            "reduce_total": t_write - t0,
        },
    }


def _reduce(spark, features, results, target, pca, check, featurize_report):
    """The Spark jobs of :func:`reduce_full`, written into ``target``."""
    t0 = time.perf_counter()
    # Opened once and cached: the fit's pass and the projection read the same batches.
    with open_features(features, spark) as opened:
        model = pca.fit(opened)
        info, d = opened.info, model.n_features_in_
        logger.info(
            f"reduce: {info['rows']} rows x {d} features ({info['error_rows']} error rows skipped)"
        )
        t_fit = time.perf_counter()
        t_read = t_fit - model.timings["eigh"]
        cum = float(np.sum(model.explained_variance_ratio_))
        logger.info(f"reduce: k={model.n_components_} components explain {cum:.1%} of the variance")

        with model.project_matrix(opened.matrix) as projected:
            write_projections(spark, projected, Results(target).projections)
        model.save(Results(target).model, spark)  # whatever RESULTS is named
        t_write = time.perf_counter()

    summary = fit_summary(
        features, results, model, info["rows"], info["error_rows"], pca.requested,
        (t0, t_read, t_fit, t_write),
    )  # fmt: skip
    if featurize_report is not None:
        summary["featurize"] = featurize_report
        summary["timings_s"]["featurize"] = featurize_report.get("seconds")
    if check == "spark-ml":
        logger.info("reduce: cross-checking against Spark ML StandardScaler + PCA ...")
        summary["spark_ml_check"] = spark_ml_check(spark, features, target, model)
    hadoopfs.write_text(spark, Results(target).summary, json.dumps(summary, indent=2))
    return summary
