"""What the report shows, read from a ``RESULTS`` folder (and the features it names).

Every read goes through :mod:`stages.storage.fs`: a local ``RESULTS`` with pyarrow and plain
files (no Spark, a second or two), any URI Spark reads given a SparkSession.  Nothing
the driver holds grows with the rows (:mod:`stages.report.rows`): the counts per class,
a sample of at most :data:`SCATTER_POINTS` rows for the scatter, at most
:data:`MAX_ERROR_ROWS` error rows, and a few thumbnails, taken from the projections'
``thumb`` (a photo is opened only for a row without one: RESULTS made before
featurize kept thumbnails).
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

import numpy as np

from stages.base.contract import THUMB_PX
from stages.base.errors import UsageError
from stages.report.rows import (
    SCATTER_POINTS,
    ProjectionRows,
    error_rows_local,
    error_rows_spark,
    read_local,
    read_spark,
)
from stages.storage.fs import FileSystem, HadoopFileSystem, filesystem, local_path
from stages.storage.layout import Results

__all__ = [
    "MAX_ERROR_ROWS",
    "SCATTER_POINTS",
    "THUMBNAILS_PER_CLASS",
    "THUMBNAIL_PX",
    "ReportData",
    "load_results",
    "open_results",
]

THUMBNAILS_PER_CLASS = 4
# The size featurize makes its thumbnails at, so a photo's fallback thumbnail matches them.
THUMBNAIL_PX = THUMB_PX
# The page lists at most this many error rows (the counts per class are complete).
MAX_ERROR_ROWS = 500
_HOW = "give the folder written by `fruits-pipeline reduce FEATURES RESULTS` (or `run`)"


@dataclass
class ReportData:
    """What the page shows, read from a RESULTS folder by :func:`load_results`.

    Attributes
    ----------
    results : str
    summary : dict
        ``summary.json``.
    explained_variance_ratio : ndarray of shape (n_features,)
        Every component's share (``pca_model/arrays.npz``), not only the first k.
    counts : dict
        Rows in the PCA per class (exact).
    labels : list of str
        The scatter's sample (at most ``SCATTER_POINTS`` rows, stratified by class).
    pcs : ndarray of shape (len(labels), min(k, 2))
        The sample's first two principal components.
    errors : list of (path, label, reason), or None when the features were not reachable
    error_counts : dict
        Error rows per class (all of them, ``errors`` may be cut at ``MAX_ERROR_ROWS``).
    thumbnails : dict
        Class -> list of ``(path, data URI)``.
    notes : list of str
        What the page could not show, and why.
    scatter_points : int
        The bound the sample was drawn with.
    """

    results: str
    summary: Dict[str, Any]
    explained_variance_ratio: np.ndarray
    counts: Dict[str, int]
    labels: List[str]
    pcs: np.ndarray
    errors: Optional[List[Tuple[str, str, str]]] = None
    error_counts: Dict[str, int] = field(default_factory=dict)
    thumbnails: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    scatter_points: int = SCATTER_POINTS

    @property
    def k(self) -> int:
        """Number of components kept."""
        return int(self.summary["k"])

    @property
    def features(self) -> Optional[str]:
        """The features Parquet the PCA was fitted on, as ``summary.json`` names it."""
        featurize = self.summary.get("featurize") or {}
        return featurize.get("output") or self.summary.get("features")

    @property
    def rows(self) -> int:
        """Rows in the PCA (all of them; the scatter may show a sample)."""
        return sum(self.counts.values())

    def class_counts(self) -> Dict[str, int]:
        """Rows in the PCA per class, by class name."""
        return dict(sorted(self.counts.items()))


def open_results(results: str, spark=None) -> FileSystem:
    """The filesystem that reads ``results``: Hadoop's given ``spark``, else the local one.

    Raises
    ------
    UsageError
        ``results`` is not local and no SparkSession is given.
    """
    if spark is None and local_path(results) is None:
        raise UsageError(
            f"RESULTS {results} is not a local path: copy it first "
            f"(`aws s3 cp --recursive {results} Results/`, then `fruits-pipeline report Results`) "
            "or call stages.report.write_report(results, spark=spark)"
        )
    return filesystem(spark)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read_summary(fs: FileSystem, base: str, results: str) -> Dict[str, Any]:
    uri = Results(base).summary
    if not fs.exists(uri):
        raise UsageError(f"{results} has no summary.json, so it is not a RESULTS folder: {_HOW}")
    try:
        summary = json.loads(fs.read_text(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"{uri} is not valid JSON ({exc}): re-run `fruits-pipeline reduce` with --overwrite"
        ) from None
    missing = [key for key in ("rows", "k") if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise UsageError(
            f"{uri} has no {', '.join(missing)}: it was not written by `fruits-pipeline reduce`; "
            "re-run it with --overwrite"
        )
    return summary


def _read_ratio(fs: FileSystem, base: str, results: str) -> np.ndarray:
    uri = Results(base).arrays
    if not fs.exists(uri):
        raise UsageError(f"{results} has no pca_model/arrays.npz: {_HOW}")
    try:
        with np.load(io.BytesIO(fs.read_bytes(uri))) as z:
            return np.asarray(z["explained_variance_ratio"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(
            f"{uri} is not a PCA model ({exc}): re-run `fruits-pipeline reduce` with --overwrite"
        ) from None


def _read_projections(
    fs: FileSystem, base: str, results: str, bound: int, per_class: int
) -> ProjectionRows:
    uri = Results(base).projections
    if not fs.exists(uri):
        raise UsageError(f"{results} has no projections/: {_HOW}")
    try:
        if isinstance(fs, HadoopFileSystem):
            return read_spark(fs.spark, uri, bound, per_class)
        return read_local(local_path(uri) or uri, bound, per_class)
    except UsageError:
        raise
    except Exception as exc:  # pyarrow's and Spark's errors for a bad table differ
        raise UsageError(
            f"{uri} is not a projections table ({_first_line(exc)}): "
            "re-run `fruits-pipeline reduce` with --overwrite"
        ) from None


def _error_rows(
    fs: FileSystem, uri: str, limit: int
) -> Tuple[List[Tuple[str, str, str]], Dict[str, int]]:
    """The first ``limit`` error rows by path, and the error rows per class (bounded:
    :func:`~stages.report.rows.error_rows_local`)."""
    if isinstance(fs, HadoopFileSystem):
        return error_rows_spark(fs.spark, uri, limit)
    return error_rows_local(local_path(uri) or uri, limit)


def _read_errors(fs: FileSystem, data: ReportData, base: str) -> None:
    features = data.features
    if not features:
        data.notes.append("summary.json names no features Parquet: error rows not shown.")
        return
    candidates = [features]
    if local_path(features) is not None and not os.path.isabs(local_path(features) or ""):
        # A relative path was relative to where the run started; try beside RESULTS too.
        candidates.append(os.path.join(os.path.dirname(base), os.path.basename(features)))
    for uri in candidates:
        try:
            if not fs.exists(uri):
                continue
            data.errors, data.error_counts = _error_rows(fs, uri, MAX_ERROR_ROWS)
            return
        except Exception as exc:  # unreadable or not a features table: say so, go on
            data.notes.append(f"could not read error rows from {uri}: {_first_line(exc)}")
            return
    how = (
        ""
        if isinstance(fs, HadoopFileSystem)
        else " (an s3:// path needs write_report(..., spark=spark))"
    )
    data.notes.append(f"features {features} not reachable from here{how}: error rows not shown.")


def _image_bytes(fs: FileSystem, uri: str) -> Optional[bytes]:
    # Some filesystems give %20 for a space: try the unquoted spelling too.
    for candidate in dict.fromkeys((uri, unquote(uri))):
        try:
            return fs.read_bytes(candidate)
        except OSError:
            continue
    return None


def _thumbnail(data: bytes) -> Optional[str]:
    from stages.featurize.images import thumbnail_jpeg

    # featurize's size and quality: the same picture as a thumb made there.
    jpeg = thumbnail_jpeg(data, THUMBNAIL_PX, quality=80)
    return None if jpeg is None else _data_uri(jpeg)


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _read_thumbnails(fs: FileSystem, data: ReportData, rows: ProjectionRows) -> None:
    """Each class's first rows' ``thumb``; the photo only where a row has none."""
    skipped: List[str] = []
    opened = 0
    for label in sorted(rows.firsts):
        shown = []
        for p in rows.firsts[label]:
            thumb = rows.thumbs.get(p)
            if thumb is not None:
                shown.append((p, _data_uri(thumb)))
                continue
            opened += 1
            raw = _image_bytes(fs, p)
            uri = _thumbnail(raw) if raw else None
            if uri is None:
                skipped.append(p)
            else:
                shown.append((p, uri))
        data.thumbnails[label] = shown
    made = opened - len(skipped)
    if made:
        data.notes.append(
            f"{made} thumbnail(s) made from the photos: their projections rows carry no "
            "thumb (features made before featurize kept thumbnails; `featurize --overwrite` "
            "then `reduce --overwrite` adds them)."
        )
    if skipped:
        data.notes.append(
            f"{len(skipped)} thumbnail(s) skipped: no thumb in the projections and the image "
            "not readable from here "
            f"(e.g. {skipped[0]}); copy the images locally or pass a SparkSession."
        )


def load_results(
    results: str,
    spark=None,
    thumbnails_per_class: int = THUMBNAILS_PER_CLASS,
    scatter_points: int = SCATTER_POINTS,
) -> ReportData:
    """Read what the report shows from ``results``.

    Parameters
    ----------
    results : str
        A RESULTS folder: a local path or ``file:`` URI; any URI Spark reads when
        ``spark`` is given.
    spark : SparkSession, optional
        Read through Spark instead of pyarrow (needed for ``s3://``).
    thumbnails_per_class : int
    scatter_points : int
        The scatter's bound: at most this many rows, stratified by class.

    Raises
    ------
    UsageError
        ``results`` is missing, is not a RESULTS folder, or is remote without ``spark``.
    """
    fs = open_results(results, spark)
    base = results.rstrip("/") or "/"
    if not fs.exists(base):
        raise UsageError(f"RESULTS {results} does not exist: {_HOW}")
    summary = _read_summary(fs, base, results)
    ratio = _read_ratio(fs, base, results)
    per_class = max(0, thumbnails_per_class)
    rows = _read_projections(fs, base, results, scatter_points, per_class)
    data = ReportData(results, summary, ratio, rows.counts, rows.labels, rows.pcs)
    data.scatter_points = scatter_points
    _read_errors(fs, data, base)
    _read_thumbnails(fs, data, rows)
    return data
