"""``--check spark-ml``: fit Spark ML's StandardScaler + PCA and record the agreement.

Spark ML is a reference that can be wrong (its SVD under pure-Java F2J LAPACK returns bad
vectors on rank-deficient covariances): :func:`spark_lapack` records which LAPACK ran and
the comparison says when the reference is not to be trusted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

from linalg.kernels import PCAFit, pca_answer_problems
from stages.reduce.pca_model import PCAModel
from stages.storage.layout import Results

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
    k = model.n_components_
    t0 = time.perf_counter()
    theirs = _fit_spark_ml(spark, features, k)
    t_fit = time.perf_counter()
    check: Dict[str, Any] = {"k": k, "spark_lapack": spark_lapack(spark)}
    problems = pca_answer_problems(theirs.pc, theirs.ratio, theirs.variance, theirs.total)
    check["spark_ml_valid"] = not problems
    if problems:
        theirs.projected.unpersist()
        check["spark_ml_invalid"] = f"{SPARK_ML_INVALID} ({'; '.join(problems)})"
        check["spark_ml_fit_transform_s"] = t_fit - t0
        return check
    agreement, signs = component_agreement(model.pca_fit, theirs.pc, theirs.ratio)
    diff = _projection_difference(spark, results, theirs.projected, signs)
    theirs.projected.unpersist()
    scale = float(diff["scale"] or 0.0)
    max_abs = float(diff["max_abs_diff"] or 0.0)
    check.update(
        {
            "rows_compared": int(diff["n"]),
            **agreement,
            "projection_max_abs_diff": max_abs,
            "projection_scale": scale,
            "projection_max_abs_diff_over_scale": max_abs / scale if scale else 0.0,
            "spark_ml_fit_transform_s": t_fit - t0,
            "compare_s": time.perf_counter() - t_fit,
        }
    )
    return check


@dataclass
class _SparkMLAnswer:
    pc: np.ndarray  # (d, k)
    ratio: np.ndarray  # explained variance ratios
    variance: np.ndarray  # variances of the projections
    total: float  # the trace of the standardised covariance
    projected: Any  # DataFrame (cached): path, p


def _fit_spark_ml(spark, features: str, k: int) -> _SparkMLAnswer:
    """Spark ML's StandardScaler + PCA on the usable rows of ``features``."""
    from pyspark.ml.feature import PCA as SparkPCA
    from pyspark.ml.feature import StandardScaler
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.stat import Summarizer
    from pyspark.sql import functions as F

    rows = (
        spark.read.parquet(features)
        .where(F.col("error").isNull() & F.col("features").isNotNull())
        .select("path", array_to_vector("features").alias("x"))
    )
    scaler = StandardScaler(withMean=True, withStd=True, inputCol="x", outputCol="z").fit(rows)
    scaled = scaler.transform(rows)
    pca = SparkPCA(k=k, inputCol="z", outputCol="p").fit(scaled)
    projected = pca.transform(scaled).select("path", "p").cache()
    variance = projected.select(Summarizer.variance(projected.p).alias("v")).first()["v"]
    return _SparkMLAnswer(
        pc=pca.pc.toArray(),
        ratio=np.asarray(pca.explainedVariance.toArray()),
        variance=np.asarray(variance.toArray()),
        # Standardised columns have variance 1, constant ones 0: the trace is a count.
        total=float(np.count_nonzero(scaler.std.toArray() > 0)),
        projected=projected,
    )


def component_agreement(
    fit: PCAFit, pc: np.ndarray, ratio_theirs: np.ndarray
) -> Tuple[Dict[str, Any], np.ndarray]:
    """How our components and explained variance agree with another answer's.

    Returns
    -------
    dict
        ``explained_variance_ratio_max_rel_err``, ``components_well_separated`` and the
        smallest |cos| between matching components (well separated ones, and all).
    ndarray
        The sign (+1/-1) that aligns each of their components with ours.
    """
    k = pc.shape[1]
    ours = fit.components[:, :k]
    dots = np.sum(ours * pc, axis=0)
    cos = np.abs(dots) / (np.linalg.norm(ours, axis=0) * np.linalg.norm(pc, axis=0))
    signs = np.sign(dots)
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
    return {
        "explained_variance_ratio_max_rel_err": float(ratio_rel.max()),
        "components_well_separated": int(separated.sum()),
        "components_min_abs_cos_well_separated": (
            float(cos[separated].min()) if separated.any() else None
        ),
        "components_min_abs_cos_all": float(cos.min()),
    }, signs


def _projection_difference(spark, results: str, projected, signs: np.ndarray):
    """The largest |ours - theirs| over the rows (sign-aligned), and our projections' scale:
    one job on the cluster."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    theirs = projected.select("path", vector_to_array("p").alias("theirs"))
    ours = spark.read.parquet(Results(results).projections).select("path", "pca")
    sign_lit = F.array(*[F.lit(float(s)) for s in signs])
    return (
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
