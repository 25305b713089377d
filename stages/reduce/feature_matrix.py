"""Features (the stage-1 contract) as a distributed matrix, and projections back to Parquet.

The Spark plumbing below the PCA estimator (:mod:`stages.reduce.pca`) and its model
(:mod:`stages.reduce.pca_model`):

* :func:`open_features` validates a features Parquet path (or a DataFrame with its
  schema) and opens it as a :class:`linalg.distributed.KeyedRowMatrix`:
  :func:`stages.base.arrow_rdd.to_arrow_batches` gives an RDD of Arrow record batches
  (optionally persisted in the JVM, no Python object per row); each batch becomes
  one :class:`linalg.distributed.KeyedBlock` of usable float rows with ``path`` and
  ``label`` kept as Arrow arrays.  Error rows are dropped there and counted.
* :func:`projections_frame` turns a projected matrix back into a DataFrame
  ``path, label, pca array<double>[k]`` (:func:`stages.base.arrow_rdd.from_arrow_batches`),
  the schema of ``RESULTS/projections/``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from linalg.distributed import KeyedBlock, KeyedRowMatrix
from stages.base.arrow_rdd import batch_bytes, from_arrow_batches, read_batch, to_arrow_batches
from stages.base.contract import footer_model_spec, model_identity, read_model_spec
from stages.base.errors import UsageError
from stages.base.sparkutil import SetAccumulator
from stages.storage import hadoopfs

__all__ = [
    "PROJECTIONS_SCHEMA",
    "OpenedFeatures",
    "check_features_schema",
    "feature_file_keys",
    "feature_rows",
    "open_features",
    "projections_frame",
    "read_feature_matrix",
    "write_projections",
]

# ``thumb``: the features' thumbnail, carried along for the search index (null in
# features made before thumbnails were kept).
PROJECTIONS_SCHEMA = "path string, label string, pca array<double>, thumb binary"
# How a DataFrame given instead of a path is named in error messages.
DATAFRAME_NAME = "(DataFrame)"


def _decode_blocks(batches: Iterator[bytes], schema, d: int, lengths) -> Iterator[Any]:
    """Arrow batches of one partition to KeyedBlocks of usable rows (executors).

    Error rows (``error`` set or ``features`` null) are dropped; rows whose vector
    is not ``d`` long are dropped and their lengths reported through the
    ``lengths`` accumulator, which the driver checks before writing anything.
    Without an accumulator (a lazy projection, which no driver check follows)
    such a row fails the task.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    for data in batches:
        batch = read_batch(data, schema)
        n = batch.num_rows
        feats = batch.column("features")
        ok = pc.and_(pc.is_null(batch.column("error")), pc.is_valid(feats))
        sizes = pc.list_value_length(feats)
        bad = pc.and_(ok, pc.not_equal(sizes, d))
        if pc.any(bad).as_py():
            seen = {int(x) for x in pc.unique(pc.filter(sizes, bad)).to_pylist()}
            if lengths is None:
                raise ValueError(
                    f"feature vectors of length {', '.join(map(str, sorted(seen)))}: "
                    f"this model takes vectors of length {d}"
                )
            lengths.add(seen)
            ok = pc.and_(ok, pc.invert(bad))
        rows = int(pc.sum(ok).as_py() or 0)
        good = batch if rows == n else batch.filter(ok)  # filter copies every column
        X = good.column("features").flatten().to_numpy(zero_copy_only=False).reshape(rows, d)
        keys = {"path": good.column("path"), "label": good.column("label")}
        if "thumb" in good.schema.names:
            keys["thumb"] = good.column("thumb")
        keys = pa.table(keys)
        yield KeyedBlock(X, keys)


def _projection_batch(block: KeyedBlock) -> bytes:
    """A projected block as an Arrow batch message ``path, label, pca, thumb`` (executors)."""
    import pyarrow as pa

    n, k = block.X.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    pca = pa.ListArray.from_arrays(offsets, pa.array(block.X.reshape(-1)))
    keys = block.keys
    thumb = (
        keys.column("thumb").combine_chunks()
        if "thumb" in keys.column_names
        else pa.nulls(n, pa.binary())
    )
    batch = pa.RecordBatch.from_arrays(
        [keys.column("path").combine_chunks(), keys.column("label").combine_chunks(), pca, thumb],
        names=["path", "label", "pca", "thumb"],
    )
    return batch_bytes(batch)


def check_features_schema(df, path: str) -> None:
    """Raise :class:`UsageError` unless ``df`` has the features columns and types."""
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


def feature_file_keys(spark, features: str, uris: Optional[List[str]] = None) -> Dict[str, str]:
    """``{path relative to features: uri}`` of its Parquet files (what a model covers).

    Spark names every file it writes with a per-job UUID and a run's files never
    change once committed, so a relative path names the same rows for good.
    """
    if uris is None:
        uris = [u for u, _ in hadoopfs.list_files(spark, features, ".parquet")]
    root = hadoopfs.qualified(spark, features).rstrip("/") + "/"
    return {(u[len(root) :] if u.startswith(root) else u): u for u in uris}


def _models_of(spark, files: List[str]) -> List[Optional[Dict[str, Any]]]:
    """The features model recorded in each Parquet footer (None if absent)."""

    def one(uri: str) -> Optional[Dict[str, Any]]:
        return footer_model_spec(hadoopfs.parquet_footer(spark, uri))

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
        ``file_uris``, ``lengths`` (an accumulator of the wrong lengths seen).
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
    check_features_schema(df, features)
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
    matrix, info, handle = _frame_matrix(df, features, spec, persist, allow_empty)
    info["files"] = len(files)
    info["file_uris"] = files
    return matrix, info, handle


def _frame_matrix(df, name: str, spec, persist: bool, allow_empty: bool):
    """The part of :func:`read_feature_matrix` after validation, for any features DataFrame."""
    from pyspark.sql import functions as F

    # Footers give the row count for free; one row gives the vector length.
    total = df.count()
    first = df.where(F.col("features").isNotNull()).select(F.size("features")).first()
    if first is None and allow_empty:
        return None, {"rows_total": total, "features_model": spec or {}}, None
    if first is None:
        raise UsageError(
            f"features {name} have 0 usable rows ({total} error rows): "
            "a PCA needs at least 2; featurize more images"
        )
    d = int(first[0])
    lengths = df.sparkSession.sparkContext.accumulator(set(), SetAccumulator())
    matrix, handle = feature_rows(df, d, lengths=lengths, persist=persist)
    info = {
        "rows_total": total,
        "n_features": d,
        "features_model": spec or {},
        "lengths": lengths,
    }
    return matrix, info, handle


def feature_rows(df, d: int, lengths=None, persist: bool = False) -> Tuple[KeyedRowMatrix, Any]:
    """The usable rows of a features DataFrame as a KeyedRowMatrix (lazy: no Spark job).

    Parameters
    ----------
    df : DataFrame
        Columns ``path, label, features, error`` (others are ignored).
    d : int
        The vector length.
    lengths : Accumulator of set, optional
        Collects the other lengths seen (their rows are dropped); without it a row
        of another length fails the task.
    persist : bool
        Keep the Arrow batches in the JVM for several passes.

    Returns
    -------
    matrix : KeyedRowMatrix
    handle : JVM RDD
        ``handle.unpersist(False)`` when done, if persisted.
    """

    columns = ["path", "label", "features", "error"]
    if "thumb" in df.columns:  # kept for the index (features made before have none)
        columns.append("thumb")
    raw, schema, handle = to_arrow_batches(df.select(*columns), persist=persist)
    blocks = raw.mapPartitions(
        lambda it: _decode_blocks(it, schema, d, lengths), preservesPartitioning=True
    )
    return KeyedRowMatrix(blocks, n_cols=d), handle


class OpenedFeatures:
    """Validated features opened as a matrix (:func:`open_features`); a context manager
    that releases the cached batches.

    Attributes
    ----------
    name : str
        The features path (or ``(DataFrame)``), for messages.
    matrix : KeyedRowMatrix or None
        None when ``allow_empty`` and no row is usable.
    info : dict
        See :func:`read_feature_matrix`; ``file_uris`` only for a path.
    spark : SparkSession
    """

    def __init__(self, name: str, matrix, info: Dict[str, Any], handle, spark):
        self.name = name
        self.matrix = matrix
        self.info = info
        self.spark = spark
        self._handle = handle

    @property
    def is_path(self) -> bool:
        """Whether these features were read from a path (their files are known)."""
        return "file_uris" in self.info

    def close(self) -> None:
        """Drop the cached batches (if any)."""
        if self._handle is not None:
            self._handle.unpersist(False)
            self._handle = None

    def __enter__(self) -> OpenedFeatures:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_dataframe(obj: Any) -> bool:
    """Whether ``obj`` is a Spark DataFrame (without importing pyspark for other objects)."""
    if not type(obj).__module__.startswith("pyspark."):
        return False
    from pyspark.sql import DataFrame

    return isinstance(obj, DataFrame)


def open_features(
    features, spark=None, persist: bool = True, allow_empty: bool = False
) -> OpenedFeatures:
    """Validate and open features: a Parquet path (``spark`` needed) or a DataFrame.

    A DataFrame must have the features schema (``path, label, features, error``);
    its features model is the metadata on its ``features`` column.  See
    :func:`read_feature_matrix` for the checks and ``persist``/``allow_empty``.

    Raises
    ------
    UsageError
        As :func:`read_feature_matrix`.
    """
    if is_dataframe(features):
        check_features_schema(features, DATAFRAME_NAME)
        spec = read_model_spec(features.schema)
        matrix, info, handle = _frame_matrix(features, DATAFRAME_NAME, spec, persist, allow_empty)
        return OpenedFeatures(DATAFRAME_NAME, matrix, info, handle, features.sparkSession)
    if not isinstance(features, str):
        raise TypeError(
            f"features must be a path or a Spark DataFrame, got {type(features).__name__}"
        )
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        if spark is None:
            raise UsageError(f"reading features {features} needs a SparkSession: start one first")
    matrix, info, handle = read_feature_matrix(spark, features, None, persist, allow_empty)
    return OpenedFeatures(features, matrix, info, handle, spark)


def projections_frame(spark, projected: KeyedRowMatrix):
    """A projected KeyedRowMatrix as a DataFrame ``path, label, pca, thumb`` (lazy)."""

    schema = spark.createDataFrame([], PROJECTIONS_SCHEMA).schema
    batches = projected.blocks.filter(lambda b: len(b) > 0).map(_projection_batch)
    return from_arrow_batches(spark, batches, schema)


def write_projections(spark, projected: KeyedRowMatrix, uri: str) -> None:
    """Write a projected KeyedRowMatrix as ``uri`` (Parquet ``path, label, pca, thumb``)."""
    projections_frame(spark, projected).write.mode("errorifexists").parquet(uri)
