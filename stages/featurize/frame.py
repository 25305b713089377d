"""Stage 1, featurize: JPEG images to 1280-d MobileNetV2 features in Parquet.

Runs as ``fruits-pipeline featurize INPUT OUTPUT`` or, as an EMR step does,
``spark-submit stages/steps/featurize.py INPUT OUTPUT``.

Output columns: ``path`` (the URI as Spark gives it), ``label`` (the parent
folder's name as on disk), ``features`` (array<float>[1280], null on error),
``error`` (the reason, null when fine).  The ``features`` field's metadata, stored
in every Parquet footer by Spark, records what made the features (model, alpha,
input size, weights source and SHA-256, engine, library versions).  The model runs
on the workers as :mod:`stages.featurize.engine` says (LiteRT by default); rows travel as Arrow
batches both ways (``mapInArrow``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

from stages.base.contract import IMAGE_GLOB, METADATA_KEY, features_schema
from stages.base.errors import UsageError
from stages.base.params import ModelParams
from stages.base.sparkutil import SetAccumulator, session_conf
from stages.featurize.engine import DEFAULT_BATCH, default_engine, prepare_model
from stages.featurize.model import ModelSpec
from stages.featurize.partition import (
    PartitionJob,
    arrow_batch_rows,
    featurize_partition,
    label_from_path,
)
from stages.storage import hadoopfs
from stages.storage.fetch import StoreSettings
from stages.storage.s3list import CountsParam

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_GLOB",
    "METADATA_KEY",
    "FeaturizeReport",
    "featurize_frame",
    "featurize_partition",
    "FeaturizedFrame",
    "label_from_path",
    "features_schema",
]

# Parquet tries a dictionary for every column first; for 1280 floats a row it always falls
# back, after hashing them all: the JVM's top cost of the job (profiled).  Writer options.
NO_DICTIONARY = {"parquet.enable.dictionary#features.list.element": "false"}
# Above this many images per task, we add whole waves of tasks (a straggler or a retry
# then costs one task: 2048 images are ~5 s of LiteRT work per core at alpha 0.35, ~20 s at
# 1.0); below it, one task per slot.  Each extra task costs ~0.11 CPU s in its Python
# worker (PySpark's per-task set-up; benchmarks/README.md), ~8% of a 512-image task.
IMAGES_PER_PARTITION = 2048


class RunReport:
    """Throughput and a JSON-ready dict, mixed into the dataclasses of stage-1 run reports
    (:class:`FeaturizeReport`, ``IncrementalReport``): each has ``images`` and ``seconds``."""

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
    # S3 requests by operation (ListObjectsV2, GetObject): the listing's and the
    # workers' reads, from boto3's own count (none for a local INPUT).
    requests: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict: ``python_workers`` (how many ran tasks) instead of their pids."""
        d = super().to_dict()
        d["python_workers"] = len(set(d.pop("worker_pids")))
        return d


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


def packing(n_images: int, n_parts: int, total: int, largest: int) -> Tuple[int, int]:
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
    waves more.  The count is one that :func:`packing` gives exactly (equal image
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


def escape_glob(uri: str) -> str:
    """``uri`` with Hadoop's glob characters escaped, so Spark reads it literally."""
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", uri)


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
    _requests: Any = None

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
    def requests(self) -> Dict[str, int]:
        """S3 requests the workers made reading the photos, by operation."""
        return dict(self._requests.value) if self._requests is not None else {}

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
    fetch: Optional[StoreSettings] = None,
    requests=None,
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
        a micro-batch of a stream.  With ``fetch``: ``path`` (and the listing's
        ``length``, if it has one) only.
    spec, payload
        From :func:`stages.featurize.engine.prepare_model` (``spec`` as written to the
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
    fetch : StoreSettings, optional
        The workers read the photos themselves, one GET each and many in flight
        (local files and S3: :mod:`stages.storage.fetch`); Spark reads no byte.
    requests : Accumulator, optional
        Of :class:`~stages.storage.s3list.CountsParam`: receives the workers' S3
        requests (a new one, :attr:`FeaturizedFrame.requests`, when not given).

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
    if fetch is None:
        source = images.select("path", "content")
    else:
        source = images.select("path", *(["length"] if "length" in images.columns else []))
        if requests is None:
            requests = sc.accumulator({}, CountsParam())
    if partitions is not None and source.rdd.getNumPartitions() > partitions:
        source = source.coalesce(partitions)
    n_tasks = source.rdd.getNumPartitions()

    job = PartitionJob(
        bc, model_key, spec.alpha, batch_size, url_encoded, spec.engine, spec.jpeg_draft,
        spec.exif_orientation, to_arrow_schema(schema), to_paths, fetch,
        builds, pids, counts, requests,
    )  # fmt: skip

    def run(batches):
        return featurize_partition(batches, job)

    # Arrow both ways: no Python object per row in, none per float out.
    out = source.mapInArrow(run, schema)
    # Rows reach the workers as Arrow batches of a few model batches (16 rows with
    # LiteRT): a batch of 12 MP photos stays below 100 MB of JPEG bytes.
    rows = arrow_batch_rows(batch_size)
    settings = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(rows)}
    owned = bc if broadcast is None else None
    return FeaturizedFrame(out, n_tasks, settings, owned, counts, builds, pids, requests)


def prepare_features_model(params: ModelParams) -> Tuple[ModelSpec, Any, int]:
    """What a featurize job needs from ``params``, on the driver: the ``spec`` written
    to the metadata (model, engine, decode options), the ``payload`` to broadcast
    (:func:`stages.featurize.engine.prepare_model`) and the batch size (the engine's default
    unless given)."""
    engine = params.engine or default_engine()
    spec, payload = prepare_model(params.weights, params.alpha, engine)
    spec = replace(
        spec, exif_orientation=bool(params.exif_orientation), jpeg_draft=params.jpeg_draft
    )
    batch_size = params.batch_size or DEFAULT_BATCH.get(engine, 64)
    return spec, payload, batch_size


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
            lambda r: (r[0], label_from_path(r[0], url_encoded), None, "empty file (0 bytes)", None)
        ),
        features_schema(spec),
    )


def _scan_spelling(uri: str, url_encoded: bool) -> str:
    """A file index URI (``file:///a/b%20c.jpg``) spelled as the scan's ``path``."""
    if uri.startswith("file:///"):
        uri = "file:/" + uri[len("file:///") :]
    return uri if url_encoded else unquote(uri)


def require_input(spark, uri: str) -> None:
    """Refuse an INPUT that does not exist, with the one message all stage-1 commands give.

    A path is taken literally first (a folder may be named ``[2026] {a,b}``); only when no
    such path exists is it tried as a Hadoop glob (``Test/2026/12/{01,02}/``), which must
    match something.
    """
    found = hadoopfs.exists(spark, uri)
    if not found and any(c in uri for c in "{}[]*?"):
        found = not hadoopfs.bucket_missing(spark, uri) and hadoopfs.glob_matches(spark, uri) > 0
    if not found:
        raise UsageError(f"input {uri} does not exist: give a folder of <Class>/<image>.jpg")


def write_features(spark, df, uri: str, settings: Optional[Dict[str, str]] = None) -> None:
    """Write feature rows as a new Parquet folder at ``uri`` (never over an existing one):
    the one writer of featurize, ``--incremental`` and ``watch``.

    ``settings`` are the session settings of the frame that made the rows
    (:attr:`FeaturizedFrame.settings`); the features column is written without a
    dictionary (:data:`NO_DICTIONARY`).
    """
    with session_conf(spark, settings or {}):
        df.write.mode("errorifexists").options(**NO_DICTIONARY).parquet(uri)
