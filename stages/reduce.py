"""Stage 2, reduce: features Parquet to a standardise-then-PCA projection (``Results/``).

Runs as ``fruits-pipeline reduce FEATURES RESULTS`` or, as an EMR step does,
``spark-submit stages/steps/reduce.py FEATURES RESULTS``.

Data flow (the features are read once):

1. :func:`stages.arrow_rdd.to_arrow_batches` turns the features into an RDD of
   Arrow record batches (persisted in the JVM, no Python object per row); each
   batch becomes one :class:`linalg.distributed.KeyedBlock` (float32 rows, with
   ``path`` and ``label`` kept as Arrow arrays).  Error rows are dropped there and
   counted.
2. One ``treeAggregate`` (``KeyedRowMatrix.compute_moments``) collects count, mean
   and centred cross-product in float64; the driver eigendecomposes the
   correlation matrix (d x d) with :func:`linalg.kernels.fit_pca_from_moments`.
3. The projection (d x k) and the mean are broadcast (``KeyedRowMatrix.project``);
   each block is projected with one GEMM, turned back into an Arrow batch and
   written to Parquet (:func:`stages.arrow_rdd.from_arrow_batches`).

``RESULTS/`` gets ``projections/`` (``path, label, pca array<double>[k]``),
``pca_model/`` (see :mod:`stages.pca_model`) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from linalg.distributed import KeyedBlock, KeyedRowMatrix
from linalg.kernels import fit_pca_from_moments, pca_answer_problems
from stages import hadoopfs
from stages.contract import METADATA_KEY, model_identity
from stages.errors import UsageError
from stages.outputs import atomic_output, check_disjoint
from stages.params import ReduceParams
from stages.pca_model import PCAModel
from stages.sparkutil import SetAccumulator
from stages.update import feature_file_keys

logger = logging.getLogger(__name__)

__all__ = ["reduce_features", "read_feature_matrix", "spark_ml_check", "PROJECTIONS_SCHEMA"]

PROJECTIONS_SCHEMA = "path string, label string, pca array<double>"
_SPARK_SCHEMA_KEY = "org.apache.spark.sql.parquet.row.metadata"


def _decode_blocks(index: int, batches: Iterator[bytes], schema, d: int, lengths) -> Iterator[Any]:
    """Arrow batches of one partition to KeyedBlocks of usable rows (executors).

    Error rows (``error`` set or ``features`` null) are dropped; rows whose vector
    is not ``d`` long are dropped and their lengths reported through the
    ``lengths`` accumulator, which the driver checks before writing anything.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from stages.arrow_rdd import read_batch

    for data in batches:
        batch = read_batch(data, schema)
        n = batch.num_rows
        feats = batch.column("features")
        ok = pc.and_(pc.is_null(batch.column("error")), pc.is_valid(feats))
        sizes = pc.list_value_length(feats)
        bad = pc.and_(ok, pc.not_equal(sizes, d))
        if pc.any(bad).as_py():
            lengths.add({int(x) for x in pc.unique(pc.filter(sizes, bad)).to_pylist()})
            ok = pc.and_(ok, pc.invert(bad))
        rows = int(pc.sum(ok).as_py() or 0)
        good = batch if rows == n else batch.filter(ok)  # filter copies every column
        X = good.column("features").flatten().to_numpy(zero_copy_only=False).reshape(rows, d)
        keys = pa.table({"path": good.column("path"), "label": good.column("label")})
        yield KeyedBlock(X, keys)


def _projection_batch(block: KeyedBlock) -> bytes:
    """A projected block as an Arrow batch message ``path, label, pca`` (executors)."""
    import pyarrow as pa

    from stages.arrow_rdd import batch_bytes

    n, k = block.X.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    pca = pa.ListArray.from_arrays(offsets, pa.array(block.X.reshape(-1)))
    batch = pa.RecordBatch.from_arrays(
        [
            block.keys.column("path").combine_chunks(),
            block.keys.column("label").combine_chunks(),
            pca,
        ],
        names=["path", "label", "pca"],
    )
    return batch_bytes(batch)


def _check_features_schema(df, path: str) -> None:
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StringType

    hint = "give the output of `fruits-pipeline featurize`"
    fields = {f.name: f.dataType for f in df.schema.fields}
    missing = [c for c in ("path", "label", "features", "error") if c not in fields]
    if missing:
        raise UsageError(f"{path} is not a features table: no column {', '.join(missing)}; {hint}")
    for name in ("path", "label", "error"):
        if not isinstance(fields[name], StringType):
            raise UsageError(
                f"{path}: column {name} is {fields[name].simpleString()}, expected string; {hint}"
            )
    ft = fields["features"]
    if not (isinstance(ft, ArrayType) and isinstance(ft.elementType, (FloatType, DoubleType))):
        raise UsageError(
            f"{path}: column features is {ft.simpleString()}, expected array<float>; {hint}"
        )


def _models_of(spark, files: List[str]) -> List[Optional[Dict[str, Any]]]:
    """The features model recorded in each Parquet footer (None if absent)."""

    def one(uri: str) -> Optional[Dict[str, Any]]:
        raw = hadoopfs.parquet_footer(spark, uri).get(_SPARK_SCHEMA_KEY)
        if not raw:
            return None
        for f in json.loads(raw).get("fields", []):
            if f.get("name") == "features":
                return (f.get("metadata") or {}).get(METADATA_KEY)
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, files))


def read_feature_matrix(
    spark,
    features: str,
    files: Optional[List[str]] = None,
    persist: bool = True,
    allow_empty: bool = False,
):
    """Validate a features Parquet and open it as a KeyedRowMatrix.

    ``files`` restricts the read to those Parquet files of ``features`` (the rows
    a ``reduce --update`` adds); ``persist=False`` for a single pass (its
    projection) keeps no copy of the batches.  With ``allow_empty``, features
    without a usable row give ``(None, info, None)`` instead of an error.

    The Parquet is scanned once: its Arrow batches are kept in the JVM (memory,
    then disk) and each becomes one block of usable rows in the Python workers,
    with no Python object per row.  Raises :class:`UsageError` for a missing or
    empty path, a wrong schema, or features made by different models; mixed
    vector lengths are reported in ``info["lengths"]`` after the first pass.

    Returns
    -------
    matrix : KeyedRowMatrix
    info : dict
        ``rows_total``, ``n_features``, ``features_model``, ``files``,
        ``lengths`` (an accumulator of the wrong lengths seen).
    handle : JVM RDD
        The cached batches: ``handle.unpersist(False)`` when done.
    """

    if not hadoopfs.exists(spark, features):
        raise UsageError(
            f"features {features} do not exist: "
            f"run `fruits-pipeline featurize INPUT {features}` first"
        )
    if files is None:
        files = [u for u, _ in hadoopfs.list_files(spark, features, ".parquet")]
        if not files:
            raise UsageError(f"features {features} hold no Parquet files: featurize into it again")
        base = features.rstrip("/")
        # Committed: Spark's _SUCCESS (featurize), or run records (featurize --incremental).
        if not hadoopfs.exists(spark, base + "/_SUCCESS") and not hadoopfs.list_dir(
            spark, base + "/_runs"
        ):
            raise UsageError(
                f"features {features} have no _SUCCESS marker: the run that wrote them did "
                "not finish (or another tool wrote them); featurize again"
            )
        df = spark.read.parquet(features)
    else:
        df = spark.read.parquet(*files)
    _check_features_schema(df, features)
    models = _models_of(spark, files)
    distinct = {model_identity(m): m for m in models}
    if len(distinct) > 1:
        names = "; ".join(
            "unknown"
            if m is None
            else f"{m.get('name')} alpha={m.get('alpha')} {m.get('weights_source')}"
            for m in distinct.values()
        )
        raise UsageError(
            f"features {features} were made by {len(distinct)} different models ({names}): "
            "featurize all images again with one --weights"
        )
    spec = next(iter(distinct.values()))

    from pyspark.sql import functions as F

    from stages.arrow_rdd import to_arrow_batches

    # Footers give the row count for free; one row gives the vector length.
    total = df.count()
    first = df.where(F.col("features").isNotNull()).select(F.size("features")).first()
    if first is None and allow_empty:
        return None, {"rows_total": total, "features_model": spec or {}}, None
    if first is None:
        raise UsageError(
            f"features {features} have 0 usable rows ({total} error rows): "
            "a PCA needs at least 2; featurize more images"
        )
    d = int(first[0])
    raw, schema, handle = to_arrow_batches(
        df.select("path", "label", "features", "error"), persist=persist
    )
    lengths = spark.sparkContext.accumulator(set(), SetAccumulator())
    blocks = raw.mapPartitionsWithIndex(
        lambda i, it: _decode_blocks(i, it, schema, d, lengths), preservesPartitioning=True
    )
    info = {
        "rows_total": total,
        "n_features": d,
        "features_model": spec or {},
        "files": len(files),
        "file_uris": files,
        "lengths": lengths,
    }
    return KeyedRowMatrix(blocks, n_cols=d), info, handle


def write_projections(spark, projected: KeyedRowMatrix, uri: str) -> None:
    from stages.arrow_rdd import from_arrow_batches

    schema = spark.createDataFrame([], PROJECTIONS_SCHEMA).schema
    batches = projected.blocks.filter(lambda b: len(b) > 0).map(_projection_batch)
    from_arrow_batches(spark, batches, schema).write.mode("errorifexists").parquet(uri)


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

        return update_reduce(spark, features, results, params)
    k, variance, check, overwrite = (
        params.k, params.target_variance, params.check, params.overwrite
    )  # fmt: skip
    check_disjoint([("RESULTS", results, "FEATURES", features)])
    with atomic_output(spark, results, overwrite) as target:
        summary = _reduce(
            spark, features, results, target, k, variance, check, featurize_report, index
        )
    logger.info(f"reduce: wrote {results} in {summary['timings_s']['reduce_total']:.1f} s")
    return summary


def _reduce(spark, features, results, target, k, variance, check, featurize_report, index):
    """The Spark jobs of :func:`reduce_features`, written into ``target``."""
    t0 = time.perf_counter()
    matrix, info, handle = read_feature_matrix(spark, features)
    try:
        d = info["n_features"]
        if k is not None and k > d:
            raise UsageError(f"--k {k} must be between 1 and the feature length {d}")
        # The one pass over the data: count, mean, centred cross-product (treeAggregate).
        moments = matrix.compute_moments(d)
        t_read = time.perf_counter()
        lengths = sorted(info["lengths"].value | {d})
        if len(lengths) > 1:
            raise UsageError(
                f"features {features} mix vectors of lengths {', '.join(map(str, lengths))}: "
                "every vector must come from the same model; featurize again"
            )
        if not (np.isfinite(moments.mean).all() and np.isfinite(moments.m2).all()):
            raise UsageError(
                f"features {features} hold NaN or infinite values in rows without an error: "
                "they were not written by `fruits-pipeline featurize`; featurize again"
            )
        info["rows"] = moments.n
        info["error_rows"] = info["rows_total"] - moments.n
        if moments.n < 2:
            raise UsageError(
                f"features {features} have {moments.n} usable rows "
                f"({info['error_rows']} error rows): a PCA needs at least 2; featurize more images"
            )
        logger.info(
            f"reduce: {info['rows']} rows x {d} features ({info['error_rows']} error rows skipped)"
        )
        fit = fit_pca_from_moments(moments, k=k, variance=variance)
        rank = min(moments.n - 1, int(np.count_nonzero(fit.std > 0)))
        if k is not None and k > rank:
            raise UsageError(
                f"--k {k} is above the rank {rank} of these features ({moments.n} rows, "
                f"{int(np.count_nonzero(fit.std > 0))} non-constant columns): components past "
                f"{rank} carry no variance; use --k {rank} or less, or --variance"
            )
        t_fit = time.perf_counter()
        cum = float(np.sum(fit.explained_variance_ratio[: fit.n_components]))
        logger.info(f"reduce: k={fit.n_components} components explain {cum:.1%} of the variance")

        with matrix.project(fit.projection_matrix(), fit.mean) as projected:
            write_projections(spark, projected, target.rstrip("/") + "/projections")
        model = PCAModel(
            fit,
            info["features_model"],
            m2=moments.m2,
            statistics={
                "files": sorted(feature_file_keys(spark, features, info["file_uris"])),
                "rows_total": info["rows_total"],
                "error_rows": info["error_rows"],
                "requested": {"k": k, "variance": variance},
            },
        )
        model.save(spark, target)
        t_write = time.perf_counter()
    finally:
        handle.unpersist(False)

    summary: Dict[str, Any] = {
        "features": features,
        "results": results,
        "rows": info["rows"],
        "error_rows": info["error_rows"],
        "n_features": d,
        "k": fit.n_components,
        "requested": {"k": k, "variance": variance},
        "cumulative_explained_variance": cum,
        "explained_variance_ratio": fit.explained_variance_ratio[: fit.n_components].tolist(),
        "features_model": info["features_model"],
        "timings_s": {
            "read_and_statistics": t_read - t0,
            "eigh": t_fit - t_read,
            "project_and_write": t_write - t_fit,
            "reduce_total": t_write - t0,
        },
    }
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
    from pyspark.ml.feature import PCA, StandardScaler
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
    pca = PCA(k=k, inputCol="z", outputCol="p").fit(scaled)
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
