"""The parameters of each stage, defined once: validation, command-line options, EMR argv.

Each stage has one frozen dataclass (:class:`FeaturizeParams`, :class:`ReduceParams`,
:class:`WatchParams`).  A field's metadata is its command-line option (flag, help, how
text becomes a value, which values are allowed), so the same definition serves:

- the Python API: ``featurize(spark, INPUT, OUTPUT, FeaturizeParams(jpeg_draft=2))`` or
  keyword arguments, validated by the constructor;
- the command line: :meth:`StageParams.add_arguments` and :meth:`StageParams.from_args`;
- ``emr submit``: :meth:`StageParams.to_argv` renders the step's arguments (only the
  values that differ from the stage's defaults, which are the node's defaults too).

A bad value raises :class:`~stages.base.errors.UsageError` before any JVM starts.  Nothing
here imports Spark, TensorFlow or Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stages.base.errors import UsageError
from stages.base.options import (
    Option,
    StageParams,
    at_least_1,
    check_alpha,
    duration,
    not_negative,
    option,
    parse_duration,
    positive_seconds,
    queue_url,
    share,
)

__all__ = [
    "ENGINES",
    "FeaturizeParams",
    "Option",
    "ReduceParams",
    "StageParams",
    "WatchParams",
    "parse_duration",
]

ENGINES = ("litert", "keras")
DEFAULT_VARIANCE = 0.95
TOP_MAX = 50  # the most matches one query returns (`similar` and the app)


_FEATURIZE = "featurize options"
_GROWING = "a growing bucket"


@dataclass(frozen=True)
class ModelParams(StageParams):
    """How images become features: the options ``featurize``, ``watch`` and ``run`` share."""

    weights: str = option(
        "bundled",
        flag="--weights",
        group=_FEATURIZE,
        help="imagenet (Keras download on the driver, alpha 1.0), bundled (offline alpha-0.35 "
        "ImageNet weights, the default), random:SEED, or a path to a Keras .h5 file",
    )
    alpha: Optional[float] = option(
        None, flag="--alpha", kind=float, check=check_alpha, group=_FEATURIZE,
        help="MobileNetV2 width multiplier",
    )  # fmt: skip
    engine: Optional[str] = option(
        None,
        flag="--engine",
        choices=ENGINES,
        group=_FEATURIZE,
        help="litert (TFLite flatbuffer on XNNPACK, no TensorFlow on the workers; the default "
        "where ai-edge-litert is installed) or keras (the reference)",
    )
    jpeg_draft: int = option(
        0,
        flag="--jpeg-draft",
        kind=int,
        check=not_negative,
        metavar="K",
        group=_FEATURIZE,
        help="decode large JPEGs at reduced scale, keeping >= K x 224 px (~3x faster on 12 MP "
        "photos, features within cosine 0.9996 at K=2); default 0, full decode",
    )
    batch_size: Optional[int] = option(
        None, flag="--batch-size", kind=int, check=at_least_1, group=_FEATURIZE,
        help="images per model call (default 4 with litert, 64 with keras)",
    )  # fmt: skip
    partitions: Optional[int] = option(
        None, flag="--partitions", kind=int, check=at_least_1, group=_FEATURIZE,
        help="tasks (default: from the image count)",
    )  # fmt: skip
    exif_orientation: bool = option(
        True,
        flag="--ignore-exif-orientation",
        kind=bool,
        group=_FEATURIZE,
        help="decode pixels as stored, not turned as the photo's EXIF orientation tag says",
    )


@dataclass(frozen=True)
class FeaturizeParams(ModelParams):
    """The parameters of ``featurize`` (:func:`stages.featurize.frame.featurize`)."""

    incremental: bool = option(
        False,
        flag="--incremental",
        kind=bool,
        group=_GROWING,
        help="featurize only the images not yet in OUTPUT (or whose size or time changed); "
        "each run commits atomically as OUTPUT/run=ID/",
    )
    prune: bool = option(
        False,
        flag="--prune",
        kind=bool,
        group=_GROWING,
        help="with --incremental: also drop the rows of images no longer under INPUT",
    )
    queue: Optional[str] = option(
        None, flag="--queue", metavar="URL", check=queue_url, group=_GROWING,
        help="with --incremental: the photos announced on this SQS queue of the bucket's "
        "S3 notifications (`fruits-pipeline bucket notifications`), no listing",
    )  # fmt: skip
    overwrite: bool = option(
        False, flag="--overwrite", kind=bool, group="output", help="replace an existing OUTPUT"
    )

    def cross_check(self) -> None:
        """Options that do not go together."""
        if self.prune and not self.incremental:
            raise UsageError("--prune only works with --incremental")
        if self.queue and not self.incremental:
            raise UsageError("--queue adds the announced photos to OUTPUT: give --incremental")
        if self.queue and self.prune:
            raise UsageError("--prune needs a listing of INPUT: drop --queue for that run")
        if self.incremental and self.overwrite:
            raise UsageError("--incremental adds to OUTPUT: drop --overwrite (or --incremental)")


@dataclass(frozen=True)
class ReduceParams(StageParams):
    """The parameters of ``reduce`` (:func:`stages.reduce.full.reduce_features`)."""

    k: Optional[int] = option(
        None, flag="--k", kind=int, check=at_least_1, group="reduce options",
        exclusive="size", help="number of principal components",
    )  # fmt: skip
    variance: Optional[float] = option(
        None,
        flag="--variance",
        kind=float,
        check=share,
        group="reduce options",
        exclusive="size",
        help="keep the fewest components reaching this share of variance "
        f"(default {DEFAULT_VARIANCE})",
    )
    check: Optional[str] = option(
        None,
        flag="--check",
        choices=("spark-ml",),
        group="reduce options",
        help="also fit Spark ML StandardScaler+PCA and record the agreement in summary.json",
    )
    update: bool = option(
        False,
        flag="--update",
        kind=bool,
        group=_GROWING,
        help="merge the statistics of the rows added to FEATURES since RESULTS was fitted "
        "into its saved ones, refit and re-project (k kept unless --k/--variance)",
    )
    overwrite: bool = option(
        False, flag="--overwrite", kind=bool, group="output", help="replace an existing RESULTS"
    )

    def cross_check(self) -> None:
        """Options that do not go together."""
        if self.k is not None and self.variance is not None:
            raise UsageError("give --k or --variance, not both")
        if self.update and self.overwrite:
            raise UsageError("--update rewrites RESULTS from its saved model: drop --overwrite")

    @property
    def target_variance(self) -> Optional[float]:
        """The share of variance to reach: ``variance``, or 0.95 when neither it nor
        ``k`` is given."""
        if self.k is None and self.variance is None:
            return DEFAULT_VARIANCE
        return self.variance


@dataclass(frozen=True)
class WatchParams(ModelParams):
    """The parameters of ``watch`` (:func:`stages.watch.watch`)."""

    trigger: Optional[str] = option(
        None,
        flag="--trigger",
        check=duration,
        metavar="DURATION",
        group="watch options",
        exclusive="when",
        help="a micro-batch every DURATION (e.g. 10s, 2min; default 10s); runs until stopped",
    )
    available_now: bool = option(
        False,
        flag="--available-now",
        kind=bool,
        group="watch options",
        exclusive="when",
        help="process every image not yet processed, then stop (cron / EMR step)",
    )
    checkpoint: Optional[str] = option(
        None,
        flag="--checkpoint",
        group="watch options",
        help="Structured Streaming checkpoint (default FEATURES/_watch_checkpoint)",
    )
    results: Optional[str] = option(
        None,
        flag="--results",
        group="watch options",
        help="also project each new image with the PCA model saved in this RESULTS",
    )
    max_files_per_trigger: Optional[int] = option(
        None, flag="--max-files-per-trigger", kind=int, check=at_least_1,
        group="watch options", help="at most this many new images per micro-batch",
    )  # fmt: skip
    stop_after: Optional[float] = option(
        None, flag="--stop-after", kind=float, check=positive_seconds, metavar="SECONDS",
        group="watch options",
        help="stop the query after this many seconds (default: run until killed)",
    )  # fmt: skip
    queue: Optional[str] = option(
        None, flag="--queue", metavar="URL", check=queue_url, group="watch options",
        help="new photos from this SQS queue of the bucket's S3 notifications "
        "(`fruits-pipeline bucket notifications`) instead of listing INPUT",
    )  # fmt: skip

    def cross_check(self) -> None:
        """Options that do not go together."""
        if self.available_now and self.trigger is not None:
            raise UsageError("give --trigger or --available-now, not both")

    @property
    def trigger_seconds(self) -> Optional[float]:
        """Seconds between micro-batches (10 by default), None with ``available_now``."""
        return None if self.available_now else parse_duration(self.trigger or "10s")
