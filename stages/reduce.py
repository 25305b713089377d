"""Stage 2, reduce: features Parquet to a standardise-then-PCA projection (``Results/``).

Runs as ``fruits-pipeline reduce FEATURES RESULTS`` or, as an EMR step does,
``spark-submit stages/steps/reduce.py FEATURES RESULTS``.

Plumbing over the estimator :class:`stages.pca.PCA`; data flow (the features are
read once):

1. :func:`stages.feature_matrix.open_features` turns the features into an RDD of
   Arrow record batches (persisted in the JVM, no Python object per row); each
   batch becomes one :class:`linalg.distributed.KeyedBlock` (float32 rows, with
   ``path`` and ``label`` kept as Arrow arrays).  Error rows are dropped there and
   counted.
2. ``PCA.fit``: one ``treeAggregate`` (``KeyedRowMatrix.compute_moments``) collects
   count, mean and centred cross-product in float64; the driver eigendecomposes
   the correlation matrix (d x d) with :func:`linalg.kernels.fit_pca_from_moments`.
3. The fitted :class:`stages.pca_model.PCAModel` broadcasts the projection (d x k)
   and the mean (``PCAModel.project_matrix``); each block is projected with one
   GEMM, turned back into an Arrow batch and written to Parquet
   (:func:`stages.feature_matrix.write_projections`).

``RESULTS/`` gets ``projections/`` (``path, label, pca array<double>[k]``),
``pca_model/`` (see :mod:`stages.pca_model`) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from linalg.kernels import pca_answer_problems
from stages import hadoopfs
from stages.errors import UsageError
from stages.feature_matrix import (
    PROJECTIONS_SCHEMA,
    open_features,
    read_feature_matrix,
    write_projections,
)
from stages.outputs import atomic_output, check_disjoint
from stages.params import ReduceParams
from stages.pca import PCA
from stages.pca_model import MODEL_DIR, PCAModel

logger = logging.getLogger(__name__)

__all__ = ["reduce_features", "read_feature_matrix", "spark_ml_check", "PROJECTIONS_SCHEMA"]


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
        agreement); ``update`` (:func:`stages.update.update_reduce`); ``overwrite``.
    featurize_report : dict, optional
        Stage 1's report, kept in the summary by ``fruits-pipeline run``.
    index : bool
        Also build ``RESULTS/index/`` (:func:`stages.search.build_index`).
    **options
        Fields of :class:`~stages.params.ReduceParams` given one by one:
        ``reduce_features(spark, f, r, k=5)``.

    Raises
    ------
    UsageError
        Bad arguments or features; nothing is written then.
    """
    params = ReduceParams.of(params, **options)
    if params.update:
        from stages.update import update_reduce

        if not index or featurize_report is not None:
            raise UsageError(
                "update=True keeps RESULTS whole: its search index is rebuilt and it "
                "records no featurize report (index=False and featurize_report are for a "
                "full reduce)"
            )
        return update_reduce(spark, features, results, params)
    pca = PCA(k=params.k, variance=params.variance)
    check, overwrite = params.check, params.overwrite
    check_disjoint([("RESULTS", results, "FEATURES", features)])
    with atomic_output(spark, results, overwrite) as target:
        summary = _reduce(spark, features, results, target, pca, check, featurize_report, index)
    logger.info(f"reduce: wrote {results} in {summary['timings_s']['reduce_total']:.1f} s")
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


def _reduce(spark, features, results, target, pca, check, featurize_report, index):
    """The Spark jobs of :func:`reduce_features`, written into ``target``."""
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
            write_projections(spark, projected, target.rstrip("/") + "/projections")
        model.save(target.rstrip("/") + "/" + MODEL_DIR, spark)  # whatever RESULTS is named
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
    if index:
        from stages.search import build_index

        summary["index"] = build_index(spark, target)
    hadoopfs.write_text(spark, target.rstrip("/") + "/summary.json", json.dumps(summary, indent=2))
    return summary


SPARK_ML_INVALID = (
    "Spark ML's PCA returned invalid components: its LAPACK SVD failed on this "
    "rank-deficient covariance"
)


def spark_lapack(spark) -> str:
    """The LAPACK Spark ML's SVD runs on: ``JNILAPACK`` (native) or ``F2jLAPACK`` (pure Java)."""
    try:
        lapack = spark.sparkContext._jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance()
        return str(lapack.getClass().getSimpleName())
    except Exception:  # an older Spark without dev.ludovic.netlib: say so, do not fail
        return "unknown"


def spark_ml_check(spark, features: str, results: str, model: PCAModel) -> Dict[str, Any]:
    """Fit Spark ML ``StandardScaler(withMean, withStd) + PCA(k)`` on the same rows,
    verify Spark's answer on its own terms, then compare it with ours.

    Spark's answer is checked first (:func:`linalg.kernels.pca_answer_problems`:
    orthonormal components, ratios that sum to at most 1 and equal the variance its
    own projections have): Spark ML's SVD (Breeze, LAPACK ``dgesdd``) in netlib's
    pure-Java F2J LAPACK sometimes returns wrong vectors with no error on a
    rank-deficient covariance, and a wrong reference is no reference.  When it is
    invalid, ``spark_ml_valid`` is False with the reason, and nothing is compared.
    Otherwise: eigenvalue ratios (relative error), components (|cos|, for
    eigenvalues separated from their neighbours), projections (max abs difference
    after sign alignment, over the scale of the projections); all computed on the
    cluster.
    """
    from pyspark.ml.feature import PCA as SparkPCA
    from pyspark.ml.feature import StandardScaler
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.ml.stat import Summarizer
    from pyspark.sql import functions as F

    k = model.n_components
    fit = model.fit
    t0 = time.perf_counter()
    rows = (
        spark.read.parquet(features)
        .where(F.col("error").isNull() & F.col("features").isNotNull())
        .select("path", array_to_vector("features").alias("x"))
    )
    scaler = StandardScaler(withMean=True, withStd=True, inputCol="x", outputCol="z").fit(rows)
    scaled = scaler.transform(rows)
    pca = SparkPCA(k=k, inputCol="z", outputCol="p").fit(scaled)
    projected = pca.transform(scaled).cache()
    pc = pca.pc.toArray()  # (d, k)
    ratio_theirs = np.asarray(pca.explainedVariance.toArray())
    # Standardised columns have variance 1, constant ones 0: the trace is a count.
    total = float(np.count_nonzero(scaler.std.toArray() > 0))
    var_theirs = np.asarray(
        projected.select(Summarizer.variance(projected.p).alias("v")).first()["v"].toArray()
    )
    theirs = projected.select("path", vector_to_array("p").alias("theirs"))
    t_fit = time.perf_counter()
    check: Dict[str, Any] = {"k": k, "spark_lapack": spark_lapack(spark)}
    problems = pca_answer_problems(pc, ratio_theirs, var_theirs, total)
    check["spark_ml_valid"] = not problems
    if problems:
        projected.unpersist()
        check["spark_ml_invalid"] = f"{SPARK_ML_INVALID} ({'; '.join(problems)})"
        check["spark_ml_fit_transform_s"] = t_fit - t0
        return check

    ours_c = fit.components
    cos = np.abs(np.sum(ours_c * pc, axis=0)) / (
        np.linalg.norm(ours_c, axis=0) * np.linalg.norm(pc, axis=0)
    )
    signs = np.sign(np.sum(ours_c * pc, axis=0))
    signs[signs == 0] = 1.0
    # A component is well separated when its eigenvalue's gap to its neighbours is
    # at least 1e-6 of the largest one; otherwise the eigenvector is not unique.
    w = fit.eigenvalues
    gaps = np.minimum(
        np.abs(np.diff(w, prepend=np.inf))[:k], np.abs(np.diff(w, append=-np.inf))[:k]
    )
    separated = gaps > 1e-6 * max(abs(w[0]), 1e-300)
    ratio_ours = fit.explained_variance_ratio[:k]
    ratio_rel = np.abs(ratio_theirs - ratio_ours) / np.maximum(np.abs(ratio_ours), 1e-300)

    ours = spark.read.parquet(results.rstrip("/") + "/projections").select("path", "pca")
    sign_lit = F.array(*[F.lit(float(s)) for s in signs])
    diff = (
        ours.join(theirs, "path")
        .select(
            F.array_max(
                F.zip_with(
                    F.zip_with("pca", sign_lit, lambda x, s: x * s),
                    "theirs",
                    lambda x, y: F.abs(x - y),
                )
            ).alias("d"),
            F.array_max(F.transform("pca", lambda x: F.abs(x))).alias("scale"),
        )
        .agg(
            F.max("d").alias("max_abs_diff"), F.max("scale").alias("scale"), F.count("*").alias("n")
        )
        .first()
    )
    projected.unpersist()
    t_cmp = time.perf_counter()
    scale = float(diff["scale"] or 0.0)
    check.update(
        {
            "rows_compared": int(diff["n"]),
            "explained_variance_ratio_max_rel_err": float(ratio_rel.max()),
            "components_well_separated": int(separated.sum()),
            "components_min_abs_cos_well_separated": float(cos[separated].min())
            if separated.any()
            else None,
            "components_min_abs_cos_all": float(cos.min()),
            "projection_max_abs_diff": float(diff["max_abs_diff"] or 0.0),
            "projection_scale": scale,
            "projection_max_abs_diff_over_scale": float(diff["max_abs_diff"] or 0.0) / scale
            if scale
            else 0.0,
            "spark_ml_fit_transform_s": t_fit - t0,
            "compare_s": t_cmp - t_fit,
        }
    )
    return check
