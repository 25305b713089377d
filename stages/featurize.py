"""Stage 1, featurize: JPEG images to 1280-d MobileNetV2 features in Parquet.

Runs as ``fruits-pipeline featurize INPUT OUTPUT`` or, as an EMR step does,
``spark-submit stages/featurize.py INPUT OUTPUT``.

Output columns: ``path`` (the URI as Spark gives it), ``label`` (the parent
folder's name as on disk), ``features`` (array<float>[1280], null on error),
``error`` (the reason, null when fine).  The ``features`` field's metadata, stored
in every Parquet footer by Spark, records what made the features (model, alpha,
input size, weights source and SHA-256, engine, library versions).  The model runs
on the workers as :mod:`stages.engine` says (LiteRT by default); rows travel as Arrow
batches both ways (``mapInArrow``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import unquote

if __name__ == "__main__" and not __package__:  # spark-submit stages/featurize.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from stages import hadoopfs
from stages.engine import DEFAULT_BATCH, default_engine, prepare_model
from stages.errors import UsageError
from stages.images import DecodeError, decode_image, preprocess
from stages.model import FEATURE_DIM, ModelSpec, get_featurizer

__all__ = [
    "IMAGE_GLOB",
    "METADATA_KEY",
    "FeaturizeReport",
    "featurize",
    "featurize_partition",
    "label_from_path",
    "features_schema",
    "read_model_spec",
]

# Hadoop glob: .jpg and .jpeg in any case.
IMAGE_GLOB = "*.{[jJ][pP][gG],[jJ][pP][eE][gG]}"
METADATA_KEY = "fruits_pipeline"
# Above this many images per task, we add whole waves of tasks (a straggler or a retry
# then costs one task: 2048 images are ~5 s of LiteRT work per core at alpha 0.35, ~20 s at
# 1.0); below it, one task per slot.  Each extra task costs ~0.11 CPU s in its Python
# worker (PySpark's per-task set-up; benchmarks/README.md), ~8% of a 512-image task.
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
    batches: Iterable[Any],
    broadcast_model,
    model_key: str,
    alpha: float,
    batch_size: int,
    url_encoded: bool,
    engine: str = "keras",
    builds=None,
    pids=None,
    counts=None,
    schema=None,
    jpeg_draft: int = 0,
) -> Iterator[Any]:
    """Featurize one partition of Arrow batches of ``(path, content)``, in model batches.

    Runs on the executors (``mapInArrow``).  Each output batch holds one model
    batch's rows, features as one float32 buffer (no Python object per float).  A
    row that cannot be decoded gets its reason in ``error`` and null features; the
    model is only built if a row decodes.  ``counts``, a pair of accumulators,
    receives the rows and the error rows.
    """
    import os

    import pyarrow as pa
    from pyspark import TaskContext

    if schema is None:
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(features_schema())
    list_type = schema.field("features").type
    ctx = TaskContext.get()
    threads = max(1, ctx.cpus()) if ctx is not None else 1
    featurizer = None
    seen = bad = 0

    def model_batch(paths, contents):
        nonlocal featurizer, bad
        labels = [label_from_path(p, url_encoded) for p in paths]
        errors: List[Optional[str]] = [None] * len(paths)
        arrays = []
        for i, content in enumerate(contents):
            try:
                arrays.append(decode_image(content, draft=jpeg_draft))
            except DecodeError as exc:
                errors[i] = str(exc)
        ok = np.array([e is None for e in errors], dtype=bool)
        if arrays:
            if featurizer is None:
                on_build = (lambda: builds.add(1)) if builds is not None else None
                featurizer = get_featurizer(
                    broadcast_model, model_key, alpha, threads, on_build, engine
                )
                if pids is not None:
                    pids.add({os.getpid()})
            feats = np.asarray(featurizer(preprocess(np.stack(arrays))), dtype=np.float32)
            finite = np.isfinite(feats).all(axis=1)
            decoded = np.flatnonzero(ok)
            for i in decoded[~finite]:
                errors[i] = "model output is not finite"
            ok[decoded[~finite]] = False
            feats = feats[finite]
        else:
            feats = np.zeros((0, FEATURE_DIM), np.float32)
        bad += int((~ok).sum())
        offsets = np.zeros(len(paths) + 1, np.int32)
        offsets[1:] = np.cumsum(ok) * FEATURE_DIM
        features = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(feats.ravel()), type=list_type, mask=pa.array(~ok)
        )
        columns = [pa.array(paths, pa.string()), pa.array(labels, pa.string())]
        columns += [features, pa.array(errors, pa.string())]
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    for batch in batches:
        paths = batch.column(0).to_pylist()
        contents = batch.column(1)
        seen += len(paths)
        for i in range(0, len(paths), batch_size):
            yield model_batch(
                paths[i : i + batch_size],
                [c.as_py() for c in contents[i : i + batch_size]],
            )
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
    """Tasks from the image count, in full waves: a multiple of the slots.

    One task per slot up to :data:`IMAGES_PER_PARTITION` images a task, then whole
    waves more.  The count is one that :func:`_packing` gives exactly (equal image
    counts ``q``, so ``ceil(n / q)`` tasks); with fewer images than slots, one each.
    """
    if requested is not None:
        return max(1, min(requested, n_images))
    slots = max(1, parallelism)
    if n_images <= slots:
        return max(1, n_images)
    waves = max(1, math.ceil(n_images / (slots * IMAGES_PER_PARTITION)))
    for w in range(waves, n_images // slots + 1):
        p = w * slots
        if math.ceil(n_images / math.ceil(n_images / p)) == p:
            return p
    # Few images per slot (n < slots^2): no multiple packs exactly; one wave, equal tasks.
    return math.ceil(n_images / math.ceil(n_images / slots))


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
    batch_size: Optional[int] = None,
    partitions: Optional[int] = None,
    overwrite: bool = False,
    log=None,
    engine: Optional[str] = None,
    jpeg_draft: int = 0,
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
    batch_size : int, optional
        Images per model call (default 8 with LiteRT, 64 with Keras).
    partitions : int, optional
        Tasks; default from the image count (:func:`choose_partitions`).
    overwrite : bool
    log : callable, optional
        Receives one progress line per step.
    engine : {"litert", "keras"}, optional
        How the workers run the model (:mod:`stages.engine`; default LiteRT where
        ai-edge-litert is installed); recorded in the features' metadata.
    jpeg_draft : int
        0 (default): full JPEG decode, as Keras' ``load_img``.  ``k >= 1``: Pillow's
        draft mode, decoding large JPEGs at 1/2 to 1/8 scale while they stay at
        least ``k * 224`` px (see :func:`stages.images.decode_image`); recorded in
        the metadata.

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
    engine = engine or default_engine()
    if batch_size is None:
        batch_size = DEFAULT_BATCH.get(engine, 64)
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
    if jpeg_draft < 0:
        raise UsageError(f"--jpeg-draft {jpeg_draft} must be 0 (off) or at least 1")
    spec, payload = prepare_model(weights, alpha, engine, log)
    if jpeg_draft:
        spec = replace(spec, jpeg_draft=jpeg_draft)
    url_encoded = _paths_are_url_encoded(spark, stats["pct"])
    sc = spark.sparkContext
    n_parts = choose_partitions(n_images, sc.defaultParallelism, partitions)
    log(
        f"featurize: {n_images} images under {input_path}, {n_parts} tasks, "
        f"MobileNetV2 alpha={spec.alpha} weights={spec.weights_source} engine={spec.engine}"
    )

    bc = sc.broadcast(payload)
    # Workers cache the built model under the weights' hash: a second job with the
    # same weights (a warm run) reuses it and never even reads the broadcast.
    model_key = f"{spec.weights_sha256}:{spec.alpha}:{spec.engine}"
    engine_ = spec.engine
    schema = features_schema(spec)
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(schema)
    builds = sc.accumulator(0)
    pids = sc.accumulator(set(), SetAccumulator())
    counts = (sc.accumulator(0), sc.accumulator(0))
    alpha_ = spec.alpha
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
            # Rows reach the workers as Arrow batches of one model batch: a batch of
            # 12 MP photos stays a few hundred MB.
            "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size),
        },
    ):
        # Same DataFrame, so the file listing is reused; the split settings are read
        # when this new query is planned.
        scan = images.select("path", "content")
        n_tasks = scan.rdd.getNumPartitions()

        def run(batches):
            return featurize_partition(
                batches,
                bc,
                model_key,
                alpha_,
                batch_size,
                url_encoded,
                engine_,
                builds,
                pids,
                counts,
                arrow_schema,
                jpeg_draft,
            )

        # Arrow both ways: no Python object per row in, none per float out.
        out = scan.mapInArrow(run, schema)
        if n_empty > 0:
            out = out.unionByName(_empty_file_rows(spark, images, listed, url_encoded, spec))
        mode = "overwrite" if overwrite else "errorifexists"
        # Parquet tries a dictionary for every column first; for 1280 floats a row it always
        # falls back, after hashing them all: the JVM's top cost of the job (profiled).
        no_dict = {"parquet.enable.dictionary#features.list.element": "false"}
        out.write.mode(mode).options(**no_dict).parquet(output_path)
    bc.unpersist()

    seconds = time.perf_counter() - t0
    report = FeaturizeReport(
        input=input_path,
        output=output_path,
        images=int(counts[0].value) + n_empty,
        errors=int(counts[1].value) + n_empty,
        partitions=n_tasks,
        seconds=seconds,
        model=spec.to_dict(),
        model_builds=int(builds.value),
        worker_pids=sorted(pids.value),
    )
    log(
        f"featurize: wrote {report.images} rows ({report.errors} errors) to {output_path} "
        f"in {seconds:.1f} s, {report.images_per_second:.1f} img/s"
    )
    return report


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
