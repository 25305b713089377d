"""Plain ``featurize``: every image under INPUT to a new FEATURES, committed atomically.

The scan is a local walk (:class:`_LocalScan`, which sees every file, zero-byte and
hidden ones too), an S3 listing by the executors (:class:`_ObjectScan`: ``s3://``,
``s3a://``; LISTs only, the same name rule), or Spark's listing of another Hadoop
filesystem (:class:`_HadoopScan`: ``hdfs://``); all feed the shared stage-1 path of
:mod:`stages.featurize.frame`.  Local and S3 photos are read by the workers, one
request each and many in flight (:mod:`stages.storage.fetch`); Spark reads no byte.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from stages.base.contract import features_schema
from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams
from stages.base.progress import Progress
from stages.base.sparkutil import session_conf
from stages.featurize.frame import (
    FeaturizeReport,
    choose_partitions,
    empty_file_rows,
    escape_glob,
    featurize_frame,
    packing,
    paths_are_url_encoded,
    prepare_features_model,
    read_images,
    require_input,
    write_features,
)
from stages.featurize.listing import (
    IMAGE_NAME,
    LocalListing,
    file_uri,
    walk_images,
)
from stages.featurize.model import ModelSpec
from stages.featurize.partition import label_from_path
from stages.storage.fetch import StoreSettings, is_object_store, store_settings
from stages.storage.fs import local_path
from stages.storage.outputs import atomic_output, check_disjoint
from stages.storage.s3list import RunRequests, listing_frame

logger = logging.getLogger(__name__)


def featurize_batch(
    spark,
    input_path: str,
    output_path: str,
    params: FeaturizeParams,
) -> FeaturizeReport:
    """Plain featurize: every image under ``input_path`` to a new ``output_path``.

    The entry point is :func:`stages.featurize.featurize` (it also dispatches
    ``--incremental``); ``params.incremental`` is ignored here.
    """
    check_disjoint([("OUTPUT", output_path, "INPUT", input_path)])
    t0 = time.perf_counter()
    settings = store_settings(spark) if is_object_store(input_path) else None
    tally = RunRequests(spark, settings, [input_path, output_path])
    require_input(spark, input_path)
    with atomic_output(spark, output_path, params.overwrite) as target:
        path = local_path(input_path)
        if path is not None:
            local = walk_images(path)
            if not local.files and not local.errors:
                raise UsageError(_no_images(input_path))
            scan = _LocalScan(spark, local)
        elif settings is not None:
            scan = _ObjectScan(spark, input_path, settings, tally.acc)
        else:
            scan = _HadoopScan(spark, input_path)
        report = _featurize_scan(spark, scan, input_path, output_path, target, params, tally.acc)
    report.seconds = time.perf_counter() - t0
    report.requests = tally.total()
    logger.info(
        f"featurize: wrote {report.images} rows ({report.errors} errors) to {output_path} "
        f"in {report.seconds:.1f} s, {report.images_per_second:.1f} img/s"
    )
    return report


def _no_images(input_path: str) -> str:
    return f"no .jpg/.jpeg images under {input_path}: expected <Class>/<image>.jpg files"


class _LocalScan:
    """A local INPUT: listed by :func:`stages.featurize.listing.walk_images`.  Spark's
    rows are the photos' numbers (``spark.range``: no file operation per photo on the
    driver, no path through py4j); each worker maps its numbers to the real paths by
    a broadcast table and reads the files itself."""

    def __init__(self, spark, local: LocalListing) -> None:
        self.spark = spark
        self.n_images = len(local.files)
        self.total_bytes = sum(size for _, size in local.files)
        self.largest = max((size for _, size in local.files), default=0)
        self.url_encoded = False
        self.cycles = local.cycles
        self._paths = [file_uri(p) for p, _ in local.files]
        self._errors = [(file_uri(p), reason) for p, reason in local.errors]
        self.n_extra = len(self._errors)  # the error rows of extra_rows
        self.fetch: Optional[StoreSettings] = StoreSettings()  # workers open() the files

    def source(self, n_parts: int):
        """The photos' numbers as a ``path`` column, in ``n_parts`` tasks of equal counts."""
        from pyspark.sql import functions as F

        numbers = self.spark.range(0, self.n_images, numPartitions=n_parts)
        return numbers.select(F.col("id").cast("string").alias("path"))

    def rows(self, sc):
        """``(paths mapper, its broadcast)``: the photos' numbers to their real paths."""
        paths = sc.broadcast(self._paths)

        def real(numbers):
            table = paths.value
            return [table[int(n)] for n in numbers]

        return real, paths

    def extra_rows(self, spark, spec: ModelSpec):
        """Error rows for the files that cannot be read, or None."""
        if not self._errors:
            return None
        rows = [(p, label_from_path(p), None, reason, None) for p, reason in self._errors]
        return spark.createDataFrame(rows, features_schema(spec))


class _HadoopScan:
    """An INPUT on another Hadoop filesystem (``hdfs:``): Spark's own listing and reader."""

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
        if self.n_images + self._n_empty == 0:
            raise UsageError(_no_images(input_path))
        self.url_encoded = paths_are_url_encoded(spark, stats["pct"])
        self.fetch: Optional[StoreSettings] = None  # Spark reads the bytes (hdfs:, ...)

    def source(self, n_parts: int):
        """The rows to featurize (Spark's split settings make ``n_parts`` tasks)."""
        return self.images

    def rows(self, sc):
        """``(paths mapper, broadcast)``: none here, Spark's paths are the real ones."""
        return None, None

    def extra_rows(self, spark, spec: ModelSpec):
        """Error rows for the zero-byte files the scan dropped, or None."""
        if not self.n_extra:
            return None
        return empty_file_rows(spark, self._scanned, self._listed, self.url_encoded, spec)


class _ObjectScan:
    """An INPUT on S3 (``s3://``, ``s3a://``): listed by the executors with LISTs only
    (:func:`stages.storage.s3list.listing_frame`, the name rule of every path, hidden
    names included); each worker GETs its photos, many at a time.  No HEAD anywhere:
    the LIST gave the sizes."""

    def __init__(self, spark, input_path: str, settings: StoreSettings, requests) -> None:
        from pyspark.sql import functions as F

        self.fetch: Optional[StoreSettings] = settings
        listing = listing_frame(spark, input_path, settings, IMAGE_NAME, requests)
        self.images = listing.cache()
        stats = self.images.agg(
            F.count("*").alias("n"),
            F.coalesce(F.sum("length"), F.lit(0)).alias("bytes"),
            F.coalesce(F.max("length"), F.lit(0)).alias("largest"),
        ).first()
        self.n_images = int(stats["n"])
        if self.n_images == 0:
            self.images.unpersist()
            raise UsageError(_no_images(input_path))
        self.total_bytes = int(stats["bytes"])
        self.largest = int(stats["largest"])
        self.cycles = 0
        self.n_extra = 0  # a zero-byte object is an error row of the frame itself
        self.url_encoded = False  # the keys as S3 lists them

    def source(self, n_parts: int):
        """The listing in ``n_parts`` tasks of equal counts (a row is a path and a size)."""
        return self.images.select("path", "length").repartition(n_parts)

    def rows(self, sc):
        """``(paths mapper, broadcast)``: none, the listed paths are the real ones."""
        return None, None

    def extra_rows(self, spark, spec: ModelSpec):
        """None: every listed object goes through the frame."""
        return None

    def release(self) -> None:
        """Drop the cached listing."""
        self.images.unpersist()


def _featurize_scan(
    spark, scan, input_path, output_path, target, params, requests=None
) -> FeaturizeReport:
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
    open_cost, split = packing(max(1, n_images), n_parts, scan.total_bytes, scan.largest)
    split_conf = {
        "spark.sql.files.openCostInBytes": str(open_cost),
        "spark.sql.files.maxPartitionBytes": str(split),
        # Spark caps a split at (bytes + files x open cost) / minPartitionNum: 1 keeps
        # that cap above ours.
        "spark.sql.files.minPartitionNum": "1",
    }
    logger.debug("featurize: file splits %s", split_conf)
    with session_conf(spark, split_conf):
        # Same DataFrame, so the file listing is reused; the split settings are read
        # when this new query is planned.
        frame = featurize_frame(
            spark, scan.source(n_parts), spec, payload, batch_size, scan.url_encoded,
            to_paths=to_paths, fetch=scan.fetch, requests=requests,
        )  # fmt: skip
        out = frame.df
        extra = scan.extra_rows(spark, spec)
        if extra is not None:
            out = out.unionByName(extra)
        with Progress(spark, "featurize", n_images, "images"):
            write_features(spark, out, target, frame.settings)
    frame.release()
    if paths_bc is not None:
        paths_bc.unpersist()
    if isinstance(scan, _ObjectScan):
        scan.release()

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
