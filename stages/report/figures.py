"""The report's figures: drawn on a caller's Axes, or rendered to PNG for the page.

:func:`plot_explained_variance` and :func:`plot_projection` draw on any Axes, so a
notebook shows the same pictures inline.  :func:`figure_data_uris` draws them on
``matplotlib.figure.Figure`` objects with the Agg canvas, without pyplot, so
importing this module never changes a notebook's backend.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from stages.report.data import ReportData

__all__ = [
    "LEGEND_ROWS",
    "figure_data_uris",
    "plot_explained_variance",
    "plot_projection",
    "projection_figure",
]

# Legend entries per column of the scatter's legend (131 classes: 3 columns).
LEGEND_ROWS = 45


def plot_explained_variance(
    ax, ratio: Sequence[float], k: int, target: Optional[float] = None
) -> None:
    """Draw the cumulative explained variance of every component, with k marked.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    ratio : array-like of shape (n_features,)
        Each component's share of the variance, in decreasing order.
    k : int
        Components kept (1-based count).
    target : float, optional
        The ``--variance`` share that chose k, drawn as a horizontal line.
    """
    ratio = np.asarray(ratio, dtype=np.float64)
    cum = np.cumsum(ratio)
    x = np.arange(1, ratio.size + 1)
    ax.plot(x, cum, color="C0", lw=2, label="cumulative")
    ax.plot(x, ratio, color="C1", lw=1, alpha=0.8, label="per component")
    if target is not None:
        ax.axhline(target, color="0.45", ls=":", lw=1, label=f"target {target:.0%}")
    at_k = float(cum[k - 1])
    ax.axvline(k, color="C3", ls="--", lw=1)
    ax.plot([k], [at_k], "o", color="C3", ms=7, label=f"k = {k}: {at_k:.1%}")
    ax.set_xscale("log")
    ax.set_xlim(1, max(ratio.size, 2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"number of components (log scale, {ratio.size} in all)")
    ax.set_ylabel("share of variance")
    ax.set_title("Explained variance")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center right")


def _legend_columns(n_classes: int) -> int:
    return max(1, math.ceil(n_classes / LEGEND_ROWS))


def _class_style(i: int, n_classes: int) -> Tuple[Any, str]:
    """Colour and marker of the i-th class: tab10/tab20 colours, then other markers."""
    from matplotlib import colormaps

    if n_classes <= 10:
        return colormaps["tab10"](i), "o"
    return colormaps["tab20"](i % 20), "os^DvPX*<>"[(i // 20) % 10]


def plot_projection(
    ax,
    pcs: np.ndarray,
    labels: Sequence[str],
    ratio: Optional[Sequence[float]] = None,
    legend: bool = True,
    counts: Optional[Mapping[str, int]] = None,
) -> List[str]:
    """Scatter PC1 x PC2 coloured by class, with a legend of the class names.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    pcs : ndarray of shape (n_samples, 2) or (n_samples, 1)
        With one component, classes are spread along y.
    labels : sequence of str, length n_samples
    ratio : array-like, optional
        Explained variance ratios, for the axis labels.
    legend : bool
        Put the legend (``class (rows)``) right of the axes.
    counts : mapping, optional
        Class -> its rows, for the legend when the points are a sample of them
        (default: the points of each class).

    Returns
    -------
    list of str
        The classes in legend order.
    """
    pcs = np.asarray(pcs, dtype=np.float64)
    labels = np.asarray(labels, dtype=object)
    classes = sorted(set(labels.tolist()))
    n = labels.size
    size = 30 if n <= 1000 else (10 if n <= 10000 else 3)
    for i, name in enumerate(classes):
        rows = labels == name
        color, marker = _class_style(i, len(classes))
        y = pcs[rows, 1] if pcs.shape[1] > 1 else np.full(int(rows.sum()), float(i))
        ax.scatter(
            pcs[rows, 0],
            y,
            s=size,
            color=color,
            marker=marker,
            alpha=0.85,
            edgecolors="none",
            label=f"{name} ({int(rows.sum()) if counts is None else counts.get(name, 0)})",
        )
    share = (lambda j: f" ({ratio[j]:.1%} of variance)") if ratio is not None else (lambda j: "")
    ax.set_xlabel("PC1" + share(0))
    ax.set_ylabel("PC2" + share(1) if pcs.shape[1] > 1 else "class")
    ax.set_title("Projection on the first two principal components")
    ax.grid(True, alpha=0.3)
    if legend and classes:
        ncol = _legend_columns(len(classes))
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncol=ncol,
            fontsize="small" if len(classes) <= LEGEND_ROWS else "x-small",
            title="class (rows)",
            frameon=False,
            markerscale=max(1.0, 30 / size) ** 0.5,
        )
    return classes


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_data_uris(data: ReportData) -> Tuple[str, Optional[str]]:
    """The page's two figures as PNG ``data:`` URIs: explained variance, and PC1 x PC2
    (None when there are no projections to draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = (data.summary.get("requested") or {}).get("variance")
    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)
    plot_explained_variance(fig.add_subplot(), data.explained_variance_ratio, data.k, target)
    variance = _png(fig)
    if data.pcs.shape[0] == 0 or data.pcs.shape[1] == 0:
        return variance, None
    return variance, _png(projection_figure(data))


def projection_figure(data: ReportData):
    """The PC1 x PC2 scatter of ``data``'s sample, its legend giving every class's rows,
    on a ``matplotlib.figure.Figure`` (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_classes = len(data.counts)
    ncol = _legend_columns(n_classes)
    # Tall enough for LEGEND_ROWS legend entries (x-small: about 0.17 inch each).
    fig = Figure(figsize=(7.5 + 2.2 * ncol, max(6.0, 1.0 + min(n_classes, LEGEND_ROWS) * 0.17)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plot_projection(ax, data.pcs, data.labels, data.explained_variance_ratio, counts=data.counts)
    if len(data.labels) < data.rows:
        ax.set_title(f"{ax.get_title()}\n(a sample of {len(data.labels):,} of {data.rows:,} rows)")
    return fig
