"""Stage 2, reduce: features Parquet to a standardise-then-PCA projection (``Results/``).

Runs as ``fruits-pipeline reduce FEATURES RESULTS`` or, as an EMR step does,
``spark-submit stages/reduce.py FEATURES RESULTS``.

Data flow (the features are read once):

1. ``mapInArrow`` turns each Arrow batch of the features into one
   :class:`linalg.distributed.IndexedBlock` (float32 rows, stable int64 index,
   ``path`` and ``label`` kept as Arrow arrays): no Python object per row.  Error
   rows are dropped there and counted.  The blocks are cached.
2. One ``treeAggregate`` (``IndexedRowMatrix.compute_pca``) collects count, mean
   and centred cross-product in float64; the driver eigendecomposes the
   correlation matrix (d x d).
3. The projection (d x k) and the mean are broadcast; each block is projected
   with one GEMM and written back through ``mapInArrow`` to Parquet.

``RESULTS/`` gets ``projections/`` (``path, label, pca array<double>[k]``),
``pca_model/`` (see :mod:`stages.pca_model`) and ``summary.json``.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

if __name__ == "__main__" and not __package__:  # spark-submit stages/reduce.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from linalg.distributed import IndexedBlock, IndexedRowMatrix
from stages import hadoopfs
from stages.errors import UsageError
from stages.featurize import METADATA_KEY, check_output
from stages.pca_model import PCAModel

__all__ = ["reduce_features", "read_feature_matrix", "spark_ml_check", "PROJECTIONS_SCHEMA"]

PROJECTIONS_SCHEMA = "path string, label string, pca array<double>"
_BLOCKS_SCHEMA = "n_rows long, n_errors long, dims array<int>, payload binary"
_SPARK_SCHEMA_KEY = "org.apache.spark.sql.parquet.row.metadata"
# Rows per Arrow batch, hence per block: 4096 x 1280 float32 = 20 MB.
BLOCK_ROWS = 4096


def _feature_blocks(batches: Iterator[Any]) -> Iterator[Any]:
    """mapInArrow body: Arrow batches of features to pickled IndexedBlocks (executors)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark import TaskContext

    ctx = TaskContext.get()
    base = (ctx.partitionId() if ctx is not None else 0) << 33  # as monotonically_increasing_id
    offset = 0
    for batch in batches:
        n_batch = batch.num_rows
        feats = batch.column("features")
        ok = pc.and_(pc.is_null(batch.column("error")), pc.is_valid(feats))
        n_ok = pc.sum(ok).as_py() or 0
        index = base + offset + np.nonzero(np.asarray(ok.to_numpy(zero_copy_only=False)))[0]
        offset += n_batch
        good = batch.filter(ok)
        f = good.column("features")
        lengths = pc.list_value_length(f).to_numpy(zero_copy_only=False)
        dims = sorted({int(x) for x in np.unique(lengths)}) if n_ok else []
        payload = b""
        if n_ok and len(dims) == 1:
            d = dims[0]
            values = f.flatten().to_numpy(zero_copy_only=False)
            X = np.ascontiguousarray(values.reshape(n_ok, d), dtype=np.float32)
            keys = pa.table({"path": good.column("path"), "label": good.column("label")})
            payload = pickle.dumps(IndexedBlock(index.astype(np.int64), X, keys), protocol=5)
        yield pa.RecordBatch.from_pydict(
            {
                "n_rows": [int(n_ok)],
                "n_errors": [int(n_batch - n_ok)],
                "dims": [dims],
                "payload": [payload],
            },
            schema=pa.schema(
                [
                    ("n_rows", pa.int64()),
                    ("n_errors", pa.int64()),
                    ("dims", pa.list_(pa.int32())),
                    ("payload", pa.binary()),
                ]
            ),
        )


def _projection_rows(batches: Iterator[Any]) -> Iterator[Any]:
    """mapInArrow body: pickled projected IndexedBlocks to Arrow rows (executors)."""
    import pyarrow as pa

    for batch in batches:
        for payload in batch.column("payload").to_pylist():
            block: IndexedBlock = pickle.loads(payload)
            n, k = block.X.shape
            offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
            pca = pa.ListArray.from_arrays(offsets, pa.array(block.X.reshape(-1)))
            yield pa.RecordBatch.from_arrays(
                [
                    block.keys.column("path").combine_chunks(),
                    block.keys.column("label").combine_chunks(),
                    pca,
                ],
                names=["path", "label", "pca"],
            )


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


def _identity(spec: Optional[Dict[str, Any]]):
    if spec is None:
        return None
    return (
        spec.get("name"),
        float(spec.get("alpha", 0)),
        spec.get("input_size"),
        spec.get("weights_sha256"),
    )


def read_feature_matrix(spark, features: str):
    """Validate a features Parquet and open it as a cached IndexedRowMatrix.

    One read of the Parquet: an Arrow batch becomes one block.  Raises
    :class:`UsageError` for a missing or empty path, a wrong schema, features of
    mixed lengths or made by different models.

    Returns
    -------
    matrix : IndexedRowMatrix
    info : dict
        ``rows``, ``error_rows``, ``n_features``, ``features_model``, ``files``.
    blocks_df : DataFrame
        The cached blocks (unpersist when done).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if not hadoopfs.exists(spark, features):
        raise UsageError(
            f"features {features} do not exist: "
            f"run `fruits-pipeline featurize INPUT {features}` first"
        )
    files = [u for u, _ in hadoopfs.list_files(spark, features, ".parquet")]
    if not files:
        raise UsageError(f"features {features} hold no Parquet files: featurize into it again")
    df = spark.read.parquet(features)
    _check_features_schema(df, features)
    models = _models_of(spark, files)
    distinct = {_identity(m): m for m in models}
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

    blocks_df = (
        df.select("path", "label", "features", "error")
        .mapInArrow(_feature_blocks, _BLOCKS_SCHEMA)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    stats = blocks_df.agg(
        F.coalesce(F.sum("n_rows"), F.lit(0)).alias("rows"),
        F.coalesce(F.sum("n_errors"), F.lit(0)).alias("errors"),
        F.array_distinct(F.flatten(F.collect_list("dims"))).alias("dims"),
    ).first()
    dims = sorted(stats["dims"] or [])
    info = {
        "rows": int(stats["rows"]),
        "error_rows": int(stats["errors"]),
        "n_features": dims[0] if len(dims) == 1 else None,
        "features_model": spec or {},
        "files": len(files),
    }
    if len(dims) > 1:
        blocks_df.unpersist()
        raise UsageError(
            f"features {features} mix vectors of lengths {', '.join(map(str, dims))}: "
            "every vector must come from the same model; featurize again"
        )
    if info["rows"] < 2:
        blocks_df.unpersist()
        raise UsageError(
            f"features {features} have {info['rows']} usable rows "
            f"({info['error_rows']} error rows): "
            "a PCA needs at least 2; featurize more images"
        )
    blocks = (
        blocks_df.select("payload")
        .rdd.filter(lambda r: len(r[0]) > 0)
        .map(lambda r: pickle.loads(r[0]))
    )
    return IndexedRowMatrix(blocks, n_cols=info["n_features"]), info, blocks_df


def _write_projections(spark, projected: IndexedRowMatrix, uri: str) -> None:
    pickled = projected.blocks.map(lambda b: (pickle.dumps(b, protocol=5),))
    spark.createDataFrame(pickled, "payload binary").mapInArrow(
        _projection_rows, PROJECTIONS_SCHEMA
    ).write.mode("errorifexists").parquet(uri)


def reduce_features(
    spark,
    features: str,
    results: str,
    k: Optional[int] = None,
    variance: Optional[float] = None,
    check: Optional[str] = None,
    overwrite: bool = False,
    log=None,
    featurize_report: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run stage 2 and return the summary written to ``RESULTS/summary.json``.

    Parameters
    ----------
    spark : SparkSession
    features : str
        Features Parquet (stage 1 output).
    results : str
        Output folder or URI.
    k : int, optional
        Components; else ``variance`` picks the smallest k reaching that share.
    variance : float, optional
    check : {"spark-ml"}, optional
        Also fit Spark ML ``StandardScaler + PCA`` and record the agreement.
    overwrite : bool
    log : callable, optional
    featurize_report : dict, optional
        Stage 1's report, kept in the summary by ``fruits-pipeline run``.

    Raises
    ------
    UsageError
        Bad arguments or features; nothing is written then.
    """
    log = log or (lambda msg: None)
    if k is not None and variance is not None:
        raise UsageError("give --k or --variance, not both")
    if k is None and variance is None:
        variance = 0.95
    if k is not None and k < 1:
        raise UsageError(f"--k {k} must be at least 1 (and at most the feature length)")
    if variance is not None and not 0.0 < variance <= 1.0:
        raise UsageError(f"--variance {variance} must be in (0, 1], e.g. 0.95")
    check_output(spark, results, overwrite)
    t0 = time.perf_counter()
    matrix, info, blocks_df = read_feature_matrix(spark, features)
    try:
        d = info["n_features"]
        if k is not None and k > d:
            raise UsageError(f"--k {k} must be between 1 and the feature length {d}")
        t_read = time.perf_counter()
        log(f"reduce: {info['rows']} rows x {d} features ({info['error_rows']} error rows skipped)")
        fit = matrix.compute_pca(k=k, variance=variance, n_cols=d)
        t_fit = time.perf_counter()
        cum = float(np.sum(fit.explained_variance_ratio[: fit.n_components]))
        log(f"reduce: k={fit.n_components} components explain {cum:.1%} of the variance")

        if overwrite and hadoopfs.exists(spark, results):
            hadoopfs.delete(spark, results)
        projected = matrix.multiply(fit.projection_matrix(), fit.mean)
        _write_projections(spark, projected, results.rstrip("/") + "/projections")
        model = PCAModel(fit, info["features_model"])
        model.save(spark, results)
        t_write = time.perf_counter()
    finally:
        blocks_df.unpersist()

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
            "read_and_cache": t_read - t0,
            "statistics_and_eigh": t_fit - t_read,
            "project_and_write": t_write - t_fit,
            "reduce_total": t_write - t0,
        },
    }
    if featurize_report is not None:
        summary["featurize"] = featurize_report
        summary["timings_s"]["featurize"] = featurize_report.get("seconds")
    if check == "spark-ml":
        log("reduce: cross-checking against Spark ML StandardScaler + PCA ...")
        summary["spark_ml_check"] = spark_ml_check(spark, features, results, model)
    hadoopfs.write_text(spark, results.rstrip("/") + "/summary.json", json.dumps(summary, indent=2))
    log(f"reduce: wrote {results} in {summary['timings_s']['reduce_total']:.1f} s")
    return summary


def spark_ml_check(spark, features: str, results: str, model: PCAModel) -> Dict[str, Any]:
    """Fit Spark ML ``StandardScaler(withMean, withStd) + PCA(k)`` on the same rows and
    compare: eigenvalue ratios (relative error), components (|cos|, for eigenvalues
    separated from their neighbours), projections (max abs difference after sign
    alignment, over the scale of the projections); all computed on the cluster.
    """
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import array_to_vector, vector_to_array
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
    theirs = pca.transform(scaled).select("path", vector_to_array("p").alias("theirs"))
    pc = pca.pc.toArray()  # (d, k)
    ratio_theirs = np.asarray(pca.explainedVariance.toArray())
    t_fit = time.perf_counter()

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
    t_cmp = time.perf_counter()
    scale = float(diff["scale"] or 0.0)
    return {
        "k": k,
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


if __name__ == "__main__":
    from stages.cli import main

    sys.exit(main(["reduce", *sys.argv[1:]]))
