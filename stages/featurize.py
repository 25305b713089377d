"""Stage 1, featurize: JPEG images to 1280-d MobileNetV2 features in Parquet.

Runs as ``fruits-pipeline featurize INPUT OUTPUT`` or, as an EMR step does,
``spark-submit stages/featurize.py INPUT OUTPUT``.

Output columns: ``path`` (the URI as Spark gives it), ``label`` (the parent
folder's name as on disk), ``features`` (array<float>[1280], null on error),
``error`` (the reason, null when fine).  The ``features`` field's metadata, stored
in every Parquet footer by Spark, records what made the features (model, alpha,
input size, weights source and SHA-256, library versions).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import unquote

if __name__ == "__main__" and not __package__:  # spark-submit stages/featurize.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from stages import hadoopfs
from stages.errors import UsageError
from stages.images import DecodeError, decode_image, preprocess
from stages.model import ModelSpec, get_featurizer, resolve_weights

__all__ = [
    "IMAGE_GLOB",
    "METADATA_KEY",
    "FeaturizeReport",
    "featurize",
    "featurize_frame",
    "featurize_partition",
    "FeaturizedFrame",
    "label_from_path",
    "features_schema",
    "read_model_spec",
]

# Hadoop glob: .jpg and .jpeg in any case.
IMAGE_GLOB = "*.{[jJ][pP][gG],[jJ][pP][eE][gG]}"
METADATA_KEY = "fruits_pipeline"
# Above this many images per task, we add tasks (retries and stragglers stay cheap);
# below it, one task per core keeps batches full and per-task overhead low.
IMAGES_PER_PARTITION = 2048


@dataclass
class FeaturizeReport:
    """What a featurize run did (printed by the CLI, kept in ``summary.json``)."""

    input: str
    output: str
    images: int
    errors: int
    partitions: int
    seconds: float
    model: Dict[str, Any]
    model_builds: int = 0
    worker_pids: List[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """End-to-end throughput."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["images_per_second"] = self.images_per_second
        return d


def label_from_path(path: str, url_encoded: bool = False) -> str:
    """The parent folder's name of ``path``, exactly as on disk.

    Parameters
    ----------
    path : str
        A file URI as Spark's ``binaryFile`` gives it.
    url_encoded : bool
        Whether this Spark/filesystem gives paths percent-encoded
        (``Apple%20Braeburn``); decided once per job by :func:`_paths_are_url_encoded`.
    """
    parts = path.rstrip("/").split("/")
    label = parts[-2] if len(parts) >= 2 else ""
    return unquote(label) if url_encoded else label


def features_schema(spec: Optional[ModelSpec] = None):
    """Spark schema of the features Parquet, with the model's metadata on ``features``."""
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    meta = {METADATA_KEY: spec.to_dict()} if spec is not None else {}
    return StructType(
        [
            StructField("path", StringType(), False),
            StructField("label", StringType(), False),
            StructField("features", ArrayType(FloatType(), containsNull=False), True, meta),
            StructField("error", StringType(), True),
        ]
    )


def featurize_partition(
    rows: Iterable[Tuple[str, bytes]],
    broadcast_weights,
    model_key: str,
    alpha: float,
    batch_size: int,
    url_encoded: bool,
    builds=None,
    pids=None,
    counts=None,
) -> Iterator[Tuple[str, str, Optional[List[float]], Optional[str]]]:
    """Featurize one partition of ``(path, content)`` rows, in batches.

    Runs on the executors.  A row that cannot be decoded is yielded at once with
    its reason and no features; the model is only built if a row decodes.
    ``counts``, a pair of accumulators, receives the rows and the error rows.
    """
    import os

    from pyspark import TaskContext

    ctx = TaskContext.get()
    threads = max(1, ctx.cpus()) if ctx is not None else 1
    featurizer = None
    paths: List[str] = []
    labels: List[str] = []
    arrays: List[np.ndarray] = []
    seen = bad = 0

    def flush():
        nonlocal featurizer, bad
        if featurizer is None:
            on_build = (lambda: builds.add(1)) if builds is not None else None
            featurizer = get_featurizer(broadcast_weights, model_key, alpha, threads, on_build)
            if pids is not None:
                pids.add({os.getpid()})
        feats = featurizer(preprocess(np.stack(arrays)))
        finite = np.isfinite(feats).all(axis=1)
        for p, lab, f, ok in zip(paths, labels, feats, finite):
            if ok:
                yield (p, lab, f.tolist(), None)
            else:
                bad += 1
                yield (p, lab, None, "model output is not finite")
        paths.clear()
        labels.clear()
        arrays.clear()

    for path, content in rows:
        seen += 1
        label = label_from_path(path, url_encoded)
        try:
            arr = decode_image(content)
        except DecodeError as exc:
            bad += 1
            yield (path, label, None, str(exc))
            continue
        paths.append(path)
        labels.append(label)
        arrays.append(arr)
        if len(arrays) >= batch_size:
            yield from flush()
    if arrays:
        yield from flush()
    if counts is not None:
        # Added once the partition is fully written: the write is the job's only
        # stage, whose accumulator updates Spark applies once per partition.
        counts[0].add(seen)
        counts[1].add(bad)


def _paths_are_url_encoded(spark, sample_path: Optional[str]) -> bool:
    """Whether Spark gave ``path`` percent-encoded, tested on a path holding ``%``.

    Spark versions and filesystems differ; a folder whose real name holds ``%``
    must keep it, so we ask the filesystem which reading of the string exists.
    """
    if not sample_path:
        return False  # no '%' anywhere: there is nothing to decode
    if hadoopfs.exists(spark, sample_path):
        return False
    return hadoopfs.exists(spark, unquote(sample_path))


@contextmanager
def _session_conf(spark, settings: Dict[str, str]):
    old = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def _packing(n_images: int, n_parts: int, total: int, largest: int) -> Tuple[int, int]:
    """``(openCostInBytes, maxPartitionBytes)`` that give every task the same image count.

    Spark packs files largest first and closes a task when ``size + next > split``,
    each file weighing its length plus the open cost.  With ``open_cost > q * largest``
    (``q`` images per task) and ``split = q * open_cost - 1``, q files always fit and
    q + 1 never do, whatever their sizes: equal counts, where packing by bytes gave
    tasks of 438 and 562 images (the job waits for the longer one).  Where that would
    overflow a Java long, pack by bytes (no open cost, one file of slack).
    """
    q = math.ceil(n_images / n_parts)
    open_cost = q * max(1, largest) + 1
    if q * open_cost < 2**62:
        return open_cost, q * open_cost - 1
    return 0, max(1, math.ceil(total / n_parts) + largest)


def choose_partitions(n_images: int, parallelism: int, requested: Optional[int] = None) -> int:
    """Partitions from the image count: one per core, more past 2048 images a task."""
    if requested is not None:
        return max(1, min(requested, n_images))
    return max(1, min(n_images, max(parallelism, math.ceil(n_images / IMAGES_PER_PARTITION))))


def read_images(spark, input_path: str):
    """The ``binaryFile`` DataFrame of the JPEGs under ``input_path`` (recursive)."""
    return (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", IMAGE_GLOB)
        .option("recursiveFileLookup", "true")
        .load(input_path)
    )


def check_output(spark, output_path: str, overwrite: bool) -> None:
    """Refuse to replace an existing output without ``overwrite``, or to start a job
    whose output bucket does not exist (it would fail only at the end)."""
    if hadoopfs.bucket_missing(spark, output_path):
        raise UsageError(f"the bucket of output {output_path} does not exist: create it first")
    if not overwrite and hadoopfs.has_data(spark, output_path):
        raise UsageError(
            f"output {output_path} already exists: pass --overwrite to replace it, "
            "or choose another path"
        )


def featurize(
    spark,
    input_path: str,
    output_path: str,
    weights: str = "bundled",
    alpha: Optional[float] = None,
    batch_size: int = 64,
    partitions: Optional[int] = None,
    overwrite: bool = False,
    log=None,
) -> FeaturizeReport:
    """Run stage 1: images under ``input_path`` to features Parquet at ``output_path``.

    Parameters
    ----------
    spark : SparkSession
    input_path, output_path : str
        Local paths or Hadoop URIs (``s3a://``, EMRFS ``s3://``, ``hdfs://``).
    weights : str
        ``imagenet``, ``bundled``, ``random:SEED`` or a ``.h5`` path (see
        :func:`stages.model.resolve_weights`).
    alpha : float, optional
    batch_size : int
        Images per model call.
    partitions : int, optional
        Tasks; default from the image count (:func:`choose_partitions`).
    overwrite : bool
    log : callable, optional
        Receives one progress line per step.

    Returns
    -------
    FeaturizeReport

    Raises
    ------
    UsageError
        Missing input, no images, bad weights, existing output.
    """
    from pyspark.sql import functions as F

    log = log or (lambda msg: None)
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    if partitions is not None and partitions < 1:
        raise UsageError(f"--partitions {partitions} must be at least 1")
    t0 = time.perf_counter()
    if not hadoopfs.exists(spark, input_path):
        raise UsageError(f"input {input_path} does not exist: give a folder of <Class>/<image>.jpg")
    check_output(spark, output_path, overwrite)

    images = read_images(spark, input_path)
    # One listing job, reading no image bytes: count, bytes, largest file, a '%' path.
    stats = images.agg(
        F.count("*").alias("n"),
        F.coalesce(F.sum("length"), F.lit(0)).alias("bytes"),
        F.coalesce(F.max("length"), F.lit(0)).alias("largest"),
        F.max(F.when(F.col("path").contains("%"), F.col("path"))).alias("pct"),
    ).first()
    n_images = int(stats["n"])
    # Spark's file scan silently drops zero-byte files; the file index still lists
    # them.  Count them without shipping the listing to Python.
    listed = images._jdf.inputFiles()
    n_empty = len(listed) - n_images
    if n_images + n_empty == 0:
        raise UsageError(
            f"no .jpg/.jpeg images under {input_path}: expected <Class>/<image>.jpg files"
        )
    spec, weight_arrays = resolve_weights(weights, alpha)
    url_encoded = _paths_are_url_encoded(spark, stats["pct"])
    sc = spark.sparkContext
    n_parts = choose_partitions(n_images, sc.defaultParallelism, partitions)
    log(
        f"featurize: {n_images} images under {input_path}, {n_parts} tasks, "
        f"MobileNetV2 alpha={spec.alpha} weights={spec.weights_source}"
    )

    total = int(stats["bytes"])
    open_cost, split = _packing(n_images, n_parts, total, int(stats["largest"]))
    with _session_conf(
        spark,
        {
            "spark.sql.files.openCostInBytes": str(open_cost),
            "spark.sql.files.maxPartitionBytes": str(split),
            # Spark caps a split at (bytes + files x open cost) / minPartitionNum: 1 keeps
            # that cap above ours.
            "spark.sql.files.minPartitionNum": "1",
        },
    ):
        # Same DataFrame, so the file listing is reused; the split settings are read
        # when this new query is planned.
        frame = featurize_frame(spark, images, spec, weight_arrays, batch_size, url_encoded)
        out = frame.df
        n_tasks = frame.partitions
        if n_empty > 0:
            out = out.unionByName(_empty_file_rows(spark, images, listed, url_encoded, spec))
        mode = "overwrite" if overwrite else "errorifexists"
        out.write.mode(mode).parquet(output_path)
    frame.release()

    seconds = time.perf_counter() - t0
    report = FeaturizeReport(
        input=input_path,
        output=output_path,
        images=frame.images + n_empty,
        errors=frame.errors + n_empty,
        partitions=n_tasks,
        seconds=seconds,
        model=spec.to_dict(),
        model_builds=frame.model_builds,
        worker_pids=frame.worker_pids,
    )
    log(
        f"featurize: wrote {report.images} rows ({report.errors} errors) to {output_path} "
        f"in {seconds:.1f} s, {report.images_per_second:.1f} img/s"
    )
    return report


@dataclass
class FeaturizedFrame:
    """The lazy features DataFrame of :func:`featurize_frame` and its counters.

    The counters are filled once ``df`` has been written (one action);
    call :meth:`release` after that.
    """

    df: Any
    partitions: int
    _broadcast: Any
    _counts: Tuple[Any, Any]
    _builds: Any
    _pids: Any

    @property
    def images(self) -> int:
        """Rows written (the scanned images)."""
        return int(self._counts[0].value)

    @property
    def errors(self) -> int:
        """Error rows written."""
        return int(self._counts[1].value)

    @property
    def model_builds(self) -> int:
        """Models built by the Python workers for this frame."""
        return int(self._builds.value)

    @property
    def worker_pids(self) -> List[int]:
        """Python workers that featurized rows."""
        return sorted(self._pids.value)

    def release(self) -> None:
        """Drop the weights' broadcast from the executors (if this frame made it)."""
        if self._broadcast is not None:
            self._broadcast.unpersist()


def featurize_frame(
    spark,
    images,
    spec: ModelSpec,
    weight_arrays,
    batch_size: int = 64,
    url_encoded: bool = False,
    partitions: Optional[int] = None,
    broadcast=None,
) -> FeaturizedFrame:
    """Featurize a ``binaryFile`` DataFrame: the one code path of every stage-1 job.

    ``featurize``, ``featurize --incremental`` and each micro-batch of ``watch``
    call it: the weights are broadcast once, each partition goes through
    :func:`featurize_partition` (same model cache, same error rows).

    Parameters
    ----------
    spark : SparkSession
    images : DataFrame
        With ``path`` and ``content`` (Spark's ``binaryFile`` columns); batch or
        a micro-batch of a stream.
    spec, weight_arrays
        From :func:`stages.model.resolve_weights`.
    batch_size : int
    url_encoded : bool
        See :func:`label_from_path`.
    partitions : int, optional
        Coalesce to at most this many tasks (a micro-batch comes one file a task).
    broadcast : Broadcast, optional
        ``weight_arrays`` already broadcast (a stream reuses one for every batch);
        :meth:`FeaturizedFrame.release` then leaves it alone.

    Returns
    -------
    FeaturizedFrame
        ``df`` has the :func:`features_schema` columns; nothing has run yet.
    """
    sc = spark.sparkContext
    bc = broadcast if broadcast is not None else sc.broadcast(weight_arrays)
    # Workers cache the built model under the weights' hash: a second job with the
    # same weights (a warm run) reuses it and never even reads the broadcast.
    model_key = f"{spec.weights_sha256}:{spec.alpha}"
    builds = sc.accumulator(0)
    pids = sc.accumulator(set(), SetAccumulator())
    counts = (sc.accumulator(0), sc.accumulator(0))
    alpha_ = spec.alpha
    rdd = images.select("path", "content").rdd
    if partitions is not None and rdd.getNumPartitions() > partitions:
        rdd = rdd.coalesce(partitions)
    n_tasks = rdd.getNumPartitions()

    def run(rows):
        return featurize_partition(
            ((r[0], r[1]) for r in rows),
            bc,
            model_key,
            alpha_,
            batch_size,
            url_encoded,
            builds,
            pids,
            counts,
        )

    out = spark.createDataFrame(rdd.mapPartitions(run), features_schema(spec), verifySchema=False)
    owned = bc if broadcast is None else None
    return FeaturizedFrame(out, n_tasks, owned, counts, builds, pids)


def _scan_spelling(uri: str, url_encoded: bool) -> str:
    """A file index URI (``file:///a/b%20c.jpg``) spelled as the scan's ``path``."""
    if uri.startswith("file:///"):
        uri = "file:/" + uri[len("file:///") :]
    return uri if url_encoded else unquote(uri)


def _empty_file_rows(spark, images, listed, url_encoded: bool, spec: ModelSpec):
    """Error rows for the files the index lists but the scan dropped (zero bytes)."""
    from pyspark.sql import functions as F
    from pyspark.sql.column import Column

    # The index gives URIs (percent-encoded); an array literal keeps them in the JVM.
    listing = Column(spark.sparkContext._jvm.org.apache.spark.sql.functions.lit(listed))
    uris = spark.range(1).select(F.explode(listing).alias("uri"))
    as_scanned = uris.rdd.map(lambda r: (_scan_spelling(r[0], url_encoded),)).toDF(["path"])
    missing = as_scanned.join(images.select("path"), "path", "left_anti")
    return spark.createDataFrame(
        missing.rdd.map(
            lambda r: (r[0], label_from_path(r[0], url_encoded), None, "empty file (0 bytes)")
        ),
        features_schema(spec),
    )


class SetAccumulator:
    """``AccumulatorParam`` of a set (worker pids, vector lengths seen)."""

    def zero(self, value):
        return set()

    def addInPlace(self, a, b):
        a |= b
        return a


def read_model_spec(schema) -> Optional[Dict[str, Any]]:
    """The model metadata stored on a features schema's ``features`` field, if any."""
    try:
        field_ = schema["features"]
    except KeyError:
        return None
    meta = field_.metadata.get(METADATA_KEY)
    if isinstance(meta, str):
        meta = json.loads(meta)
    return meta


if __name__ == "__main__":
    from stages.cli import main

    sys.exit(main(["featurize", *sys.argv[1:]]))
