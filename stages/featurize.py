"""Stage 1, featurize: JPEG images to 1280-d MobileNetV2 features in Parquet.

Runs as ``fruits-pipeline featurize INPUT OUTPUT`` or, as an EMR step does,
``spark-submit stages/steps/featurize.py INPUT OUTPUT``.

Output columns: ``path`` (the URI as Spark gives it), ``label`` (the parent
folder's name as on disk), ``features`` (array<float>[1280], null on error),
``error`` (the reason, null when fine).  The ``features`` field's metadata, stored
in every Parquet footer by Spark, records what made the features (model, alpha,
input size, weights source and SHA-256, engine, library versions).  The model runs
on the workers as :mod:`stages.engine` says (LiteRT by default); rows travel as Arrow
batches both ways (``mapInArrow``).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import unquote

import numpy as np

from stages import hadoopfs
from stages.contract import IMAGE_GLOB, METADATA_KEY, features_schema
from stages.engine import DEFAULT_BATCH, default_engine, prepare_model
from stages.errors import UsageError
from stages.fs import local_path
from stages.images import DecodeError, decode_image, preprocess
from stages.listing import (
    LocalListing,
    file_uri,
    hidden_object_images,
    make_view,
    view_index,
    walk_images,
)
from stages.model import ModelSpec, get_featurizer
from stages.outputs import atomic_output, check_disjoint
from stages.params import FeaturizeParams, ModelParams
from stages.sparkutil import SetAccumulator, session_conf

logger = logging.getLogger(__name__)

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
]

# Hadoop glob: .jpg and .jpeg in any case.
# Parquet tries a dictionary for every column first; for 1280 floats a row it always falls
# back, after hashing them all: the JVM's top cost of the job (profiled).  Writer options.
NO_DICTIONARY = {"parquet.enable.dictionary#features.list.element": "false"}
# Above this many images per task, we add whole waves of tasks (a straggler or a retry
# then costs one task: 2048 images are ~5 s of LiteRT work per core at alpha 0.35, ~20 s at
# 1.0); below it, one task per slot.  Each extra task costs ~0.11 CPU s in its Python
# worker (PySpark's per-task set-up; benchmarks/README.md), ~8% of a 512-image task.
IMAGES_PER_PARTITION = 2048


class RunReport:
    """Throughput and a JSON-ready dict for a stage-1 run's report (a dataclass with
    ``images`` and ``seconds``)."""

    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Images per second of the whole run."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["images_per_second"] = self.images_per_second
        return d


@dataclass
class FeaturizeReport(RunReport):
    """What a featurize run did (printed by the CLI, kept in ``summary.json``)."""

    input: str
    output: str
    images: int
    errors: int
    partitions: int
    seconds: float
    model: Dict[str, Any]
    model_builds: int = 0
    # The Python workers' process ids: the in-process evidence (tests, benchmarks) that
    # the model is built once per worker; the dict carries only their count.
    worker_pids: List[int] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict: ``python_workers`` (how many ran tasks) instead of their pids."""
        d = super().to_dict()
        d["python_workers"] = len(set(d.pop("worker_pids")))
        return d


def label_from_path(path: str, url_encoded: bool = False) -> str:
    """The parent folder's name of ``path``, exactly as on disk.

    Parameters
    ----------
    path : str
        A file URI as Spark's ``binaryFile`` gives it.
    url_encoded : bool
        Whether this Spark/filesystem gives paths percent-encoded
        (``Apple%20Braeburn``); decided once per job by :func:`paths_are_url_encoded`.
    """
    parts = path.rstrip("/").split("/")
    label = parts[-2] if len(parts) >= 2 else ""
    return unquote(label) if url_encoded else label


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
    exif_orientation: bool = True,
    to_paths=None,
) -> Iterator[Any]:
    """Featurize one partition of Arrow batches of ``(path, content)``, in model batches.

    Runs on the executors (``mapInArrow``).  Each output batch holds one model
    batch's rows, features as one float32 buffer (no Python object per float).  A
    row that cannot be decoded gets its reason in ``error`` and null features; the
    model is only built if a row decodes.  ``counts``, a pair of accumulators,
    receives the rows and the error rows.  ``to_paths`` maps the scanned paths to the
    ones written (a local INPUT is scanned through a view of symlinks).
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
                arrays.append(
                    decode_image(content, exif_orientation=exif_orientation, draft=jpeg_draft)
                )
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
            feats = np.zeros((0, 0), np.float32)
        bad += int((~ok).sum())
        # The model's own width: 1280 up to alpha 1.0, more above (1792 at 1.4).
        offsets = np.zeros(len(paths) + 1, np.int32)
        offsets[1:] = np.cumsum(ok) * feats.shape[1]
        features = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(feats.ravel()), type=list_type, mask=pa.array(~ok)
        )
        columns = [pa.array(paths, pa.string()), pa.array(labels, pa.string())]
        columns += [features, pa.array(errors, pa.string())]
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    for batch in batches:
        paths = batch.column(0).to_pylist()
        if to_paths is not None:
            paths = to_paths(paths)
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


def paths_are_url_encoded(spark, sample_path: Optional[str]) -> bool:
    """Whether Spark gave ``path`` percent-encoded, tested on a path holding ``%``.

    Spark versions and filesystems differ; a folder whose real name holds ``%``
    must keep it, so we ask the filesystem which reading of the string exists.
    """
    if not sample_path:
        return False  # no '%' anywhere: there is nothing to decode
    if hadoopfs.exists(spark, sample_path):
        return False
    return hadoopfs.exists(spark, unquote(sample_path))


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


def featurize(
    spark,
    input_path: str,
    output_path: str,
    params: Optional[FeaturizeParams] = None,
    **options: Any,
) -> RunReport:
    """Run stage 1: images under ``input_path`` to features Parquet at ``output_path``.

    Parameters
    ----------
    spark : SparkSession
    input_path, output_path : str
        Local paths or Hadoop URIs (``s3a://``, EMRFS ``s3://``, ``hdfs://``).
    params : FeaturizeParams, optional
        The options of ``fruits-pipeline featurize`` (weights, alpha, engine,
        batch size, decode options, ``incremental``, ``overwrite`` ...); see
        :class:`stages.params.FeaturizeParams` for each one.
    **options
        Fields of :class:`~stages.params.FeaturizeParams` given one by one (they
        replace those of ``params``): ``featurize(spark, i, o, weights="random:0")``.

    Returns
    -------
    FeaturizeReport, or IncrementalReport with ``incremental=True``
        (:func:`stages.incremental.featurize_incremental`).

    Raises
    ------
    UsageError
        Bad parameters (before anything is read), missing input, no images, bad
        weights, existing output.
    """
    params = FeaturizeParams.of(params, **options)
    if params.incremental:
        from stages.incremental import featurize_incremental

        return featurize_incremental(spark, input_path, output_path, params)
    check_disjoint([("OUTPUT", output_path, "INPUT", input_path)])
    t0 = time.perf_counter()
    if not hadoopfs.exists(spark, input_path):
        raise UsageError(f"input {input_path} does not exist: give a folder of <Class>/<image>.jpg")
    view = None
    try:
        with atomic_output(spark, output_path, params.overwrite) as target:
            path = local_path(input_path)
            if path is not None:
                local = walk_images(path)
                if not local.files and not local.errors:
                    raise UsageError(_no_images(input_path))
                view = make_view([p for p, _ in local.files])
                scan = _LocalScan(spark, local, view)
            else:
                scan = _HadoopScan(spark, input_path)
            report = _featurize_scan(spark, scan, input_path, output_path, target, params)
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    logger.info(
        f"featurize: wrote {report.images} rows ({report.errors} errors) to {output_path} "
        f"in {report.seconds:.1f} s, {report.images_per_second:.1f} img/s"
    )
    return report


def _no_images(input_path: str) -> str:
    return f"no .jpg/.jpeg images under {input_path}: expected <Class>/<image>.jpg files"


def escape_glob(uri: str) -> str:
    """``uri`` with Hadoop's glob characters escaped, so Spark reads it literally."""
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", uri)


class _LocalScan:
    """A local INPUT: listed by :func:`stages.listing.walk_images`, scanned through
    its view; rows map back to the real paths by the view's index."""

    def __init__(self, spark, local: LocalListing, view: str) -> None:
        self.images = read_images(spark, view)
        self.n_images = len(local.files)
        self.total_bytes = sum(size for _, size in local.files)
        self.largest = max((size for _, size in local.files), default=0)
        self.url_encoded = False
        self.cycles = local.cycles
        self._paths = [file_uri(p) for p, _ in local.files]
        self._errors = [(file_uri(p), reason) for p, reason in local.errors]
        self.n_extra = len(self._errors)  # the error rows of extra_rows

    def rows(self, sc):
        """``(paths mapper, its broadcast)``: scanned view paths to the real ones."""
        paths = sc.broadcast(self._paths)

        def real(scanned):
            table = paths.value
            return [table[view_index(p)] for p in scanned]

        return real, paths

    def extra_rows(self, spark, spec: ModelSpec):
        """Error rows for the files that cannot be read, or None."""
        if not self._errors:
            return None
        rows = [(p, label_from_path(p), None, reason) for p, reason in self._errors]
        return spark.createDataFrame(rows, features_schema(spec))


class _HadoopScan:
    """An INPUT on a Hadoop filesystem (s3a, EMRFS s3, hdfs): Spark's own listing."""

    def __init__(self, spark, input_path: str) -> None:
        from pyspark.sql import functions as F

        self.images = read_images(spark, escape_glob(input_path))
        # One listing job, reading no image bytes: count, bytes, largest file, a '%' path.
        stats = self.images.agg(
            F.count("*").alias("n"),
            F.coalesce(F.sum("length"), F.lit(0)).alias("bytes"),
            F.coalesce(F.max("length"), F.lit(0)).alias("largest"),
            F.max(F.when(F.col("path").contains("%"), F.col("path"))).alias("pct"),
        ).first()
        self.n_images = int(stats["n"])
        self.total_bytes = int(stats["bytes"])
        self.largest = int(stats["largest"])
        self.cycles = 0
        # Spark's file scan silently drops zero-byte files; the file index still lists
        # them.  Count them without shipping the listing to Python.
        self._listed = self.images._jdf.inputFiles()
        self._n_empty = len(self._listed) - self.n_images
        self.n_extra = max(self._n_empty, 0)  # the error rows of extra_rows
        self._scanned = self.images
        # Spark's listing also skips `_` and `.` names (`_DSC0001.JPG`): on S3 one flat
        # listing finds them, and the driver reads them (they are few).
        hidden = hidden_object_images(input_path)
        if hidden:
            rows = [(p, hadoopfs.read_bytes(spark, p)) for p, _ in hidden]
            extra = spark.createDataFrame(rows, "path string, content binary")
            self.images = self.images.select("path", "content").unionByName(extra)
            self.n_images += len(hidden)
            self.total_bytes += sum(size for _, size in hidden)
        if self.n_images + self._n_empty == 0:
            raise UsageError(_no_images(input_path))
        self.url_encoded = paths_are_url_encoded(spark, stats["pct"])

    def rows(self, sc):
        """``(paths mapper, broadcast)``: none here, Spark's paths are the real ones."""
        return None, None

    def extra_rows(self, spark, spec: ModelSpec):
        """Error rows for the zero-byte files the scan dropped, or None."""
        if not self.n_extra:
            return None
        return empty_file_rows(spark, self._scanned, self._listed, self.url_encoded, spec)


@dataclass
class FeaturizedFrame:
    """The lazy features DataFrame of :func:`featurize_frame` and its counters.

    Write ``df`` under :attr:`settings` (``_session_conf``: Arrow batches of one
    model batch, so a batch of 12 MP photos stays small); the counters are filled
    once it has been written (one action).  Call :meth:`release` after that.
    """

    df: Any
    partitions: int
    settings: Dict[str, str]
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
        """Drop the model's broadcast from the executors (if this frame made it)."""
        if self._broadcast is not None:
            self._broadcast.unpersist()


def featurize_frame(
    spark,
    images,
    spec: ModelSpec,
    payload,
    batch_size: int = 64,
    url_encoded: bool = False,
    partitions: Optional[int] = None,
    broadcast=None,
    to_paths=None,
) -> FeaturizedFrame:
    """Featurize a ``binaryFile`` DataFrame: the one code path of every stage-1 job.

    ``featurize``, ``featurize --incremental`` and each micro-batch of ``watch``
    call it: the model is broadcast once, each partition goes through
    :func:`featurize_partition` in Arrow batches (same model cache, same error
    rows, the decode and engine ``spec`` records).

    Parameters
    ----------
    spark : SparkSession
    images : DataFrame
        With ``path`` and ``content`` (Spark's ``binaryFile`` columns); batch or
        a micro-batch of a stream.
    spec, payload
        From :func:`stages.engine.prepare_model` (``spec`` as written to the
        metadata: engine, decode options).
    batch_size : int
    url_encoded : bool
        See :func:`label_from_path`.
    partitions : int, optional
        Coalesce to at most this many tasks (a micro-batch comes one file a task).
    broadcast : Broadcast, optional
        ``payload`` already broadcast (a stream reuses one for every batch);
        :meth:`FeaturizedFrame.release` then leaves it alone.
    to_paths : callable, optional
        Maps a batch's scanned paths to the paths written (see :class:`_LocalScan`).

    Returns
    -------
    FeaturizedFrame
        ``df`` has the :func:`features_schema` columns; nothing has run yet.
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    sc = spark.sparkContext
    bc = broadcast if broadcast is not None else sc.broadcast(payload)
    # Workers cache the built model under the weights' hash: a second job with the
    # same weights (a warm run) reuses it and never even reads the broadcast.
    model_key = f"{spec.weights_sha256}:{spec.alpha}:{spec.engine}"
    builds = sc.accumulator(0)
    pids = sc.accumulator(set(), SetAccumulator())
    counts = (sc.accumulator(0), sc.accumulator(0))
    schema = features_schema(spec)
    arrow_schema = to_arrow_schema(schema)
    alpha_, engine_, draft = spec.alpha, spec.engine, spec.jpeg_draft
    exif = spec.exif_orientation
    source = images.select("path", "content")
    if partitions is not None and source.rdd.getNumPartitions() > partitions:
        source = source.coalesce(partitions)
    n_tasks = source.rdd.getNumPartitions()

    def run(batches):
        return featurize_partition(
            batches, bc, model_key, alpha_, batch_size, url_encoded, engine_, builds, pids,
            counts, arrow_schema, draft, exif, to_paths,
        )  # fmt: skip

    # Arrow both ways: no Python object per row in, none per float out.
    out = source.mapInArrow(run, schema)
    # Rows reach the workers as Arrow batches of one model batch: a batch of 12 MP
    # photos stays a few hundred MB.
    settings = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size)}
    owned = bc if broadcast is None else None
    return FeaturizedFrame(out, n_tasks, settings, owned, counts, builds, pids)


def prepare_features_model(params: ModelParams) -> Tuple[ModelSpec, Any, int]:
    """What a featurize job needs from ``params``, on the driver: the ``spec`` written
    to the metadata (model, engine, decode options), the ``payload`` to broadcast
    (:func:`stages.engine.prepare_model`) and the batch size (the engine's default
    unless given)."""
    engine = params.engine or default_engine()
    spec, payload = prepare_model(params.weights, params.alpha, engine)
    spec = replace(
        spec, exif_orientation=bool(params.exif_orientation), jpeg_draft=params.jpeg_draft
    )
    batch_size = params.batch_size or DEFAULT_BATCH.get(engine, 64)
    return spec, payload, batch_size


def _featurize_scan(spark, scan, input_path, output_path, target, params) -> FeaturizeReport:
    """The Spark job of :func:`featurize` over a listed ``scan``, written to ``target``."""
    spec, payload, batch_size = prepare_features_model(params)
    partitions = params.partitions
    sc = spark.sparkContext
    n_images = scan.n_images
    n_parts = choose_partitions(max(1, n_images), sc.defaultParallelism, partitions)
    loops = f" ({scan.cycles} folder link(s) to a folder already listed)" if scan.cycles else ""
    logger.info(
        f"featurize: {n_images} images under {input_path}, {n_parts} tasks, "
        f"MobileNetV2 alpha={spec.alpha} weights={spec.weights_source} "
        f"engine={spec.engine}{loops}"
    )
    to_paths, paths_bc = scan.rows(sc)
    open_cost, split = _packing(max(1, n_images), n_parts, scan.total_bytes, scan.largest)
    packing = {
        "spark.sql.files.openCostInBytes": str(open_cost),
        "spark.sql.files.maxPartitionBytes": str(split),
        # Spark caps a split at (bytes + files x open cost) / minPartitionNum: 1 keeps
        # that cap above ours.
        "spark.sql.files.minPartitionNum": "1",
    }
    logger.debug("featurize: file splits %s", packing)
    with session_conf(spark, packing):
        # Same DataFrame, so the file listing is reused; the split settings are read
        # when this new query is planned.
        frame = featurize_frame(
            spark, scan.images, spec, payload, batch_size, scan.url_encoded, to_paths=to_paths
        )
        out = frame.df
        extra = scan.extra_rows(spark, spec)
        if extra is not None:
            out = out.unionByName(extra)
        with session_conf(spark, frame.settings):
            out.write.mode("errorifexists").options(**NO_DICTIONARY).parquet(target)
    frame.release()
    if paths_bc is not None:
        paths_bc.unpersist()

    return FeaturizeReport(
        input=input_path,
        output=output_path,
        images=frame.images + scan.n_extra,
        errors=frame.errors + scan.n_extra,
        partitions=frame.partitions,
        seconds=0.0,
        model=spec.to_dict(),
        model_builds=frame.model_builds,
        worker_pids=frame.worker_pids,
    )


def _scan_spelling(uri: str, url_encoded: bool) -> str:
    """A file index URI (``file:///a/b%20c.jpg``) spelled as the scan's ``path``."""
    if uri.startswith("file:///"):
        uri = "file:/" + uri[len("file:///") :]
    return uri if url_encoded else unquote(uri)


def empty_file_rows(spark, images, listed, url_encoded: bool, spec: ModelSpec):
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
