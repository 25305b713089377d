"""``fruits-pipeline report``: one self-contained HTML page of a ``RESULTS`` folder.

The page holds the cumulative explained variance (every component, the chosen k
marked), the PC1 x PC2 scatter coloured by class (a stratified sample of at most
``SCATTER_POINTS`` rows), a few thumbnails and the exact row counts per class,
the error rows of the features Parquet, the stage timings and the Spark ML
cross-check.

Three layers, each importing only the one before it:

* :mod:`stages.report.data` reads a RESULTS folder into a :class:`ReportData`
  (through :mod:`stages.storage.fs`: a local one without Spark, ``s3://`` with a
  SparkSession, as ``write_report(results, spark=spark)`` in the notebook on EMR);
* :mod:`stages.report.figures` draws the figures (on a caller's Axes, or to PNG);
* :mod:`stages.report.html` renders the page.
"""

from __future__ import annotations

from typing import Optional

from stages.base.errors import UsageError
from stages.report.data import (
    MAX_ERROR_ROWS,
    SCATTER_POINTS,
    THUMBNAIL_PX,
    THUMBNAILS_PER_CLASS,
    ReportData,
    load_results,
)
from stages.report.figures import (
    LEGEND_ROWS,
    plot_explained_variance,
    plot_projection,
    projection_figure,
)
from stages.report.html import render_html
from stages.storage.fs import filesystem, local_path

__all__ = [
    "LEGEND_ROWS",
    "MAX_ERROR_ROWS",
    "SCATTER_POINTS",
    "THUMBNAILS_PER_CLASS",
    "THUMBNAIL_PX",
    "ReportData",
    "load_results",
    "local_path",
    "plot_explained_variance",
    "plot_projection",
    "projection_figure",
    "render_html",
    "write_report",
]


def write_report(
    results: str,
    out: Optional[str] = None,
    spark=None,
    thumbnails_per_class: int = THUMBNAILS_PER_CLASS,
    scatter_points: int = SCATTER_POINTS,
) -> str:
    """Write the HTML report of ``results`` and return where it went.

    Parameters
    ----------
    results : str
        A RESULTS folder (``fruits-pipeline reduce`` output): local, or any URI
        Spark reads when ``spark`` is given.
    out : str, optional
        The HTML file; default ``RESULTS/report.html``.
    spark : SparkSession, optional
        Read (and write) through Spark; needed for ``s3://``.
    thumbnails_per_class : int
    scatter_points : int
        The scatter's bound (a stratified sample of at most this many rows).

    Returns
    -------
    str
        The report's path (local) or URI.

    Raises
    ------
    UsageError
        Missing or invalid RESULTS, or a remote one without ``spark``.
    """
    data = load_results(results, spark, thumbnails_per_class, scatter_points)
    page = render_html(data).encode("utf-8")
    if out is None:
        out = results.rstrip("/") + "/report.html"
    if spark is None and local_path(out) is None:
        raise UsageError(f"cannot write the report to {out} without Spark: give a local --out FILE")
    return filesystem(spark).write_bytes(out, page)
