"""``reduce --update``: merge the rows added since a PCA was fitted into its saved moments.

A full ``reduce`` saves its sufficient statistics in ``pca_model/`` (count,
mean, centred cross-product ``M2`` in float64) and the names of the feature files
they cover.  An update reads only the files added since for the statistics pass,
merges (Chan–Golub–LeVeque: exact up to rounding, the same merge the full pass
does between partitions), refits (``k`` kept, or ``--k`` / ``--variance`` given
again) and re-projects every row.  When a covered file is gone (rows replaced or
pruned by ``featurize --incremental --prune``), subtracting moments would cancel
catastrophically, so the update says so and makes a full pass instead.

The new ``RESULTS`` is written to ``RESULTS/_update/`` and swapped in once
complete (``_update/_READY``); an update that dies before leaves ``RESULTS`` as
it was, one that dies during the swap is finished by the next update.

:func:`project_run` projects one committed run of the features table with a
saved model (``watch --results``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Optional, Set

import numpy as np

from linalg.kernels import merge_moments
from stages.base.contract import model_identity
from stages.base.errors import UsageError, explain
from stages.base.params import ReduceParams
from stages.reduce.feature_matrix import (
    feature_file_keys,
    feature_rows,
    read_feature_matrix,
    write_projections,
)
from stages.reduce.full import fit_summary, reduce_full
from stages.reduce.index import index_step
from stages.reduce.index_append import append_index
from stages.reduce.pca import PCA
from stages.reduce.pca_model import PCAModel
from stages.reduce.sparkml import spark_ml_check
from stages.storage import hadoopfs
from stages.storage.layout import PROJECTIONS, RESULTS_PARTS, Results
from stages.storage.table import RUN_PREFIX, FeaturesTable

logger = logging.getLogger(__name__)

__all__ = ["feature_file_keys", "update_reduce", "project_run", "project_pending"]


def _swap_in(spark, results: str, tmp: str) -> None:
    for part in RESULTS_PARTS:
        src, dst = f"{tmp}/{part}", f"{results}/{part}"
        if hadoopfs.exists(spark, src):
            hadoopfs.delete(spark, dst)
            if not hadoopfs.rename(spark, src, dst):
                raise OSError(f"could not rename {src} to {dst}")
    hadoopfs.delete(spark, tmp)


def update_reduce(
    spark,
    features: str,
    results: str,
    params: Optional[ReduceParams] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Update ``results`` with the feature rows added since its model was fitted.

    Parameters
    ----------
    spark : SparkSession
    features, results : str
    params : ReduceParams, optional
        ``k`` or ``variance``: a new choice of components (default: the one the
        model was fitted with); ``check``; ``update`` is implied.
    **options
        Fields of :class:`~stages.base.params.ReduceParams` given one by one.

    Returns
    -------
    dict
        The new summary (also ``RESULTS/summary.json``), with ``update``: ``mode``
        (``merge``, ``full`` or ``none``), the new and gone files, the reason.

    Raises
    ------
    UsageError
        No saved model or statistics, bad arguments, features of another model.
    """
    params = ReduceParams.of(params, **{**options, "update": True})  # refuses `overwrite`
    results = results.rstrip("/")
    tmp = f"{results}/_update"
    if hadoopfs.exists(spark, f"{tmp}/_READY"):
        logger.info("reduce --update: finishing the swap of an update that died during it")
        _swap_in(spark, results, tmp)
    if not hadoopfs.has_data(spark, results):
        logger.info(f"reduce --update: {results} does not exist yet: a full reduce creates it")
        summary = reduce_full(spark, features, results, params)
        summary["update"] = {"mode": "full", "reason": "no RESULTS yet", "new_files": None}
        return summary
    model = _saved_model(spark, features, results)
    requested = (
        model.statistics.get("requested") or {"k": model.n_components_, "variance": None}
        if params.k is None and params.variance is None
        else {"k": params.k, "variance": params.variance}
    )
    covered = _covered_files(spark, features, model)  # after a recovery: list the files then
    uris = feature_file_keys(spark, features)
    gone = sorted(covered - set(uris))
    new = sorted(set(uris) - covered)
    if hadoopfs.exists(spark, tmp):
        hadoopfs.delete(spark, tmp)  # an update that died before it was complete
    t0 = time.perf_counter()
    info_update: Dict[str, Any] = {"new_files": len(new), "gone_files": len(gone)}
    if gone:
        reason = (
            f"{len(gone)} feature files the model covered are gone (rows replaced or pruned): "
            "subtracting their moments is not exact, so this is a full pass"
        )
        logger.info(f"reduce --update: {reason}")
        summary = reduce_full(
            spark, features, tmp, ReduceParams(check=params.check, **requested), index=False
        )
        info_update.update({"mode": "full", "reason": reason})
    elif not new and requested == model.statistics.get("requested"):
        logger.info(
            "reduce --update: no feature file added since the model was fitted: "
            f"{results} is current"
        )
        summary = json.loads(hadoopfs.read_text(spark, Results(results).summary))
        info_update.update({"mode": "none", "seconds": time.perf_counter() - t0})
        summary["update"] = info_update
        return summary
    else:
        summary = _merge_and_refit(
            spark, features, results, tmp, model, uris, new, requested, params.check, t0
        )
        info_update["mode"] = "merge"
    info_update["seconds"] = time.perf_counter() - t0
    summary["results"] = results
    summary["update"] = info_update
    hadoopfs.write_text(spark, Results(tmp).summary, json.dumps(summary, indent=2))
    hadoopfs.write_text(spark, f"{tmp}/_READY", "")
    _swap_in(spark, results, tmp)
    # Committed.  The index follows the new PCA: every vector moved, so it is built again
    # from the projections (the thumbnails ride in them: no photo is read); `similar` and
    # `serve` refuse the old one as stale until then.
    index_step(spark, results, summary)
    logger.info(
        f"reduce --update: wrote {results} in {info_update['seconds']:.1f} s "
        f"({info_update['mode']})"
    )
    return summary


def _saved_model(spark, features: str, results: str) -> PCAModel:
    """The model in ``results``, with the statistics an update merges into."""
    if not hadoopfs.exists(spark, Results(results).model):
        raise UsageError(
            f"{results} holds no pca_model: run `fruits-pipeline reduce {features} {results}` first"
        )
    if not hadoopfs.exists(spark, features):
        raise UsageError(f"features {features} do not exist")
    model = PCAModel.load(results, spark)
    if model.moments is None or "files" not in model.statistics:
        raise UsageError(
            f"the model in {results} kept no statistics (made by an older version): "
            "run `fruits-pipeline reduce --overwrite` once"
        )
    return model


def _covered_files(spark, features: str, model: PCAModel) -> Set[str]:
    """The feature files the model's statistics cover, as they are named now."""
    covered = set(model.statistics["files"])
    if hadoopfs.exists(spark, features.rstrip("/") + "/_runs"):
        table = FeaturesTable(spark, features)
        table.recover()
        # A plain featurize's files moved, unchanged, into the first run: same rows.
        for rec in table.records():
            if rec.get("kind") == "migrate":
                for name in rec["files"]:
                    if name in covered:
                        covered = (covered - {name}) | {f"{RUN_PREFIX}{rec['run']}/{name}"}
    return covered


def _added_moments(spark, features: str, results: str, new_uris: List[str], model: PCAModel):
    """The moments of the rows in ``new_uris`` (``None`` when none is usable), how many
    rows they hold and how many of those are error rows."""
    if not new_uris:
        return None, 0, 0
    d = model.pca_fit.n_features
    matrix, info, handle = read_feature_matrix(
        spark, features, files=new_uris, persist=False, allow_empty=True
    )
    if model_identity(info["features_model"]) != model_identity(model.features_model):
        raise UsageError(
            f"the rows added to {features} were made by another model than "
            f"the one in {results}: featurize them with the same --weights"
        )
    rows = int(info["rows_total"])
    if matrix is None:
        return None, rows, rows
    try:
        added = matrix.compute_moments(d)
        lengths = sorted(info["lengths"].value | {info["n_features"]})
    finally:
        handle.unpersist(False)
    if lengths != [d]:
        raise UsageError(
            f"the rows added to {features} have vectors of lengths "
            f"{', '.join(map(str, lengths))}, the model {d}: featurize them again"
        )
    return added, rows, rows - added.n


def _merge_and_refit(
    spark,
    features: str,
    results: str,
    tmp: str,
    model: PCAModel,
    uris: Dict[str, str],
    new: List[str],
    requested: Dict[str, Any],
    check: Optional[str],
    t0: float,
) -> Dict[str, Any]:
    """Merge the new files' moments into the model's, refit, project every row into
    ``tmp``; the summary of the new model."""
    added, new_rows, new_errors = _added_moments(
        spark, features, results, [uris[n] for n in new], model
    )
    merged = model.moments if added is None else merge_moments(model.moments, added)
    t_stats = time.perf_counter()
    logger.info(
        f"reduce --update: {len(new)} new feature files, {new_rows} rows "
        f"({new_errors} errors) merged into the statistics of {model.pca_fit.n_samples} rows"
    )
    error_rows = int(model.statistics.get("error_rows", 0)) + new_errors
    new_model = PCA(**requested).fit_moments(
        merged,
        model.features_model,
        statistics={
            "files": sorted(uris),
            "rows_total": merged.n + error_rows,
            "error_rows": error_rows,
            "requested": requested,
        },
    )
    fit = new_model.pca_fit
    t_fit = time.perf_counter()
    # Every row again, with the new model: a plain lazy read (the folder was listed,
    # and the new rows checked, above; the old ones when the model was fitted).
    matrix, handle = feature_rows(spark.read.parquet(features), model.pca_fit.n_features)
    try:
        with new_model.project_matrix(matrix) as projected:
            write_projections(spark, projected, Results(tmp).projections)
    finally:
        handle.unpersist(False)
    new_model.save(Results(tmp).model, spark)
    t_write = time.perf_counter()
    cum = float(np.sum(fit.explained_variance_ratio[: fit.n_components]))
    logger.info(
        f"reduce --update: k={fit.n_components} components explain {cum:.1%} of the variance"
    )
    summary = fit_summary(
        features, results, new_model, merged.n, error_rows, requested,
        (t0, t_stats, t_fit, t_write),
    )  # fmt: skip
    if check == "spark-ml":
        summary["spark_ml_check"] = spark_ml_check(spark, features, tmp, new_model)
    return summary


def project_run(spark, table, run: str, model, results: str) -> int:
    """Project the usable rows of one committed run into
    ``RESULTS/projections/watch-<run>.parquet`` (one file, renamed into place)."""
    results = results.rstrip("/")
    final = Results(results).part(PROJECTIONS, f"watch-{run}.parquet")
    if hadoopfs.exists(spark, final):
        return 0
    staging = f"{results}/_staging/watch-{run}"
    # The model's DataFrame transform (error rows skipped), in one file; its broadcast
    # goes with the block (one per micro-batch of a watch).
    with model.projected(spark.read.parquet(table.run_uri(run))) as projected:
        projected.coalesce(1).write.mode("overwrite").parquet(staging)
    parts = [u for u, _ in hadoopfs.list_files(spark, staging, ".parquet")]
    if not parts:  # a run of error rows only: nothing to project
        hadoopfs.delete(spark, staging)
        return 0
    (part,) = parts
    if not hadoopfs.rename(spark, part, final):
        raise OSError(f"could not rename {part} to {final}")
    hadoopfs.delete(spark, staging)
    _index_rows(spark, results, final)
    return hadoopfs.parquet_rows(spark, final)  # from its footer: no job per micro-batch


def _index_rows(spark, results: str, projections: str) -> None:
    """Add a run's projected rows to ``RESULTS/index`` (a new generation, which a running
    ``serve`` loads); a failure is a warning: the watch goes on, the rows are projected."""

    try:
        append_index(spark, results, projections)
    except Exception as exc:  # the features and projections are committed: go on
        logger.warning(
            f"watch: the index of {results} was not updated ({explain(exc)[1]}): "
            f"rebuild it with `fruits-pipeline index {results}`"
        )


def project_pending(spark, table, model, results: str) -> int:
    """Project the live runs the model neither covers nor has projected yet (a watch
    that died between a run's commit and its projection)."""
    covered = set(model.statistics.get("files", []))
    done = 0
    for run in table.live_runs():
        uris = [u for u, _ in hadoopfs.list_files(spark, table.run_uri(run), ".parquet")]
        names = set(feature_file_keys(spark, table.uri, uris))
        if names and not names <= covered:
            n = project_run(spark, table, run, model, results)
            if n:
                logger.info(f"watch: run {run}: {n} rows projected (left over by a previous watch)")
                done += n
    return done
