"""Stage 1: photos to FEATURES (``path, label, features[1280], error``).

:func:`featurize` is the entry point of the CLI and the Python API: a new FEATURES
(:mod:`stages.featurize.batch`) or, with ``incremental``, a run added to a growing one
(:mod:`stages.featurize.incremental`).  :func:`~stages.watch.watch` keeps
FEATURES up to date with Structured Streaming.  All three share one path from photos to
feature rows (:mod:`stages.featurize.frame`, :mod:`stages.featurize.partition`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from stages.base.params import FeaturizeParams
from stages.featurize.batch import featurize_batch
from stages.featurize.frame import FeaturizeReport
from stages.featurize.incremental import IncrementalReport, featurize_incremental

__all__ = ["featurize", "featurize_incremental", "FeaturizeReport", "IncrementalReport"]


def featurize(
    spark,
    input_path: str,
    output_path: str,
    params: Optional[FeaturizeParams] = None,
    **options: Any,
) -> Union[FeaturizeReport, IncrementalReport]:
    """Run stage 1: images under ``input_path`` to features Parquet at ``output_path``.

    Parameters
    ----------
    spark : SparkSession
    input_path, output_path : str
        Local paths or Hadoop URIs (``s3a://``, EMRFS ``s3://``, ``hdfs://``).
    params : FeaturizeParams, optional
        The options of ``fruits-pipeline featurize`` (weights, alpha, engine,
        batch size, decode options, ``incremental``, ``overwrite`` ...); see
        :class:`stages.base.params.FeaturizeParams` for each one.
    **options
        Fields of :class:`~stages.base.params.FeaturizeParams` given one by one (they
        replace those of ``params``): ``featurize(spark, i, o, weights="random:0")``.

    Returns
    -------
    FeaturizeReport, or IncrementalReport with ``incremental=True``
        (:func:`featurize_incremental`).

    Raises
    ------
    UsageError
        Bad parameters (before anything is read), missing input, no images, bad
        weights, existing output.
    """
    params = FeaturizeParams.of(params, **options)
    if params.incremental:
        return featurize_incremental(spark, input_path, output_path, params)
    return featurize_batch(spark, input_path, output_path, params)
