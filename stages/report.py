"""``fruits-pipeline report``: one self-contained HTML page of a ``RESULTS`` folder.

The page holds the cumulative explained variance (every component, the chosen k
marked), the PC1 x PC2 scatter coloured by class, a few thumbnails and the row
counts per class, the error rows of the features Parquet, the stage timings and
the Spark ML cross-check.  Every picture is embedded as a base64 ``data:`` URI:
the file can be mailed or opened offline, it loads nothing from anywhere.

I/O is kept apart from drawing.  A local ``RESULTS`` is read with pyarrow and
numpy (no Spark, a second or two); an ``s3://`` one needs a SparkSession
(``write_report(results, spark=spark)``, as the notebook does on EMR) or a local
copy.  The figures draw on a caller's Axes (:func:`plot_explained_variance`,
:func:`plot_projection`) so a notebook shows the same pictures inline; the page
draws them on ``matplotlib.figure.Figure`` objects with the Agg canvas, without
pyplot, so importing this module never changes a notebook's backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

import numpy as np

from stages.errors import UsageError

__all__ = [
    "ReportData",
    "load_results",
    "local_path",
    "plot_explained_variance",
    "plot_projection",
    "render_html",
    "write_report",
]

THUMBNAILS_PER_CLASS = 4
THUMBNAIL_PX = 80
# Legend entries per column of the scatter's legend (131 classes: 3 columns).
LEGEND_ROWS = 45
# The page lists at most this many error rows (the counts per class are complete).
MAX_ERROR_ROWS = 500
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")  # two letters at least: not C:
_HOW = "give the folder written by `fruits-pipeline reduce FEATURES RESULTS` (or `run`)"
# Agreement bounds of the Spark ML cross-check (float64):
# figure -> (op, bound, how the bound reads).
_CHECK_BOUNDS = {
    "explained_variance_ratio_max_rel_err": ("<=", 1e-9, "1e-9"),
    "components_min_abs_cos_well_separated": (">=", 1.0 - 1e-9, "1 - 1e-9"),
    "projection_max_abs_diff_over_scale": ("<=", 1e-8, "1e-8"),
}
_TIMING_NAMES = {
    "featurize": "featurize (stage 1)",
    "read_and_statistics": "reduce: read, moments and covariance (one pass)",
    "eigh": "reduce: eigendecomposition on the driver",
    "project_and_write": "reduce: project and write",
    "reduce_total": "reduce (stage 2) total",
}


def local_path(uri: str) -> Optional[str]:
    """The local filesystem path of ``uri`` (a plain path or a ``file:`` URI), else None.

    ``file:/a/b``, ``file:///a/b`` and ``file://localhost/a/b`` all give ``/a/b``;
    ``s3://b/k`` gives None.
    """
    m = _SCHEME.match(uri)
    if m is None:
        return uri
    if m.group(1).lower() != "file":
        return None
    rest = uri[len(m.group(0)) :]
    if rest.startswith("//"):  # file://host/path: the host is dropped
        rest = rest[2:]
        rest = rest[rest.index("/") :] if "/" in rest else "/"
    return rest


# ---------------------------------------------------------------------------- I/O


class _LocalIO:
    """Reads a local RESULTS with pyarrow and plain files."""

    def exists(self, uri: str) -> bool:
        p = local_path(uri)
        return p is not None and os.path.exists(p)

    def read_bytes(self, uri: str) -> bytes:
        with open(local_path(uri) or uri, "rb") as fh:
            return fh.read()

    def image_bytes(self, uri: str) -> Optional[bytes]:
        p = local_path(uri)
        if p is None:  # s3:// and friends: not reachable without Spark
            return None
        for candidate in (p, unquote(p)):  # some filesystems give %20 for a space
            if os.path.isfile(candidate):
                try:
                    with open(candidate, "rb") as fh:
                        return fh.read()
                except OSError:
                    return None
        return None

    def projections(self, uri: str) -> Tuple[List[str], List[str], np.ndarray]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(local_path(uri), columns=["path", "label", "pca"])
        n = table.num_rows
        pca = table.column("pca").combine_chunks()
        lengths = pc.min_max(pc.list_value_length(pca)).as_py() if n else {"min": 0, "max": 0}
        if lengths["min"] != lengths["max"]:
            raise ValueError(f"pca arrays of {lengths['min']} to {lengths['max']} values")
        k = int(lengths["min"] or 0)
        values = np.asarray(pc.list_flatten(pca).to_numpy(zero_copy_only=False), dtype=np.float64)
        # Every row has k values (one fit): the flat buffer is (n, k).
        pcs = values.reshape(n, k)[:, : min(k, 2)]
        return table.column("path").to_pylist(), table.column("label").to_pylist(), pcs

    def errors(self, uri: str, limit: int) -> Tuple[List[Tuple[str, str, str]], Dict[str, int]]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(local_path(uri), columns=["path", "label", "error"])
        table = table.filter(pc.is_valid(table.column("error")))
        counts = Counter(table.column("label").to_pylist())
        table = table.sort_by("path").slice(0, limit)
        cols = [table.column(c).to_pylist() for c in ("path", "label", "error")]
        return list(zip(*cols)), dict(counts)

    def write_bytes(self, uri: str, data: bytes) -> str:
        path = local_path(uri)
        if path is None:
            raise UsageError(
                f"cannot write the report to {uri} without Spark: give a local --out FILE"
            )
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        return path


class _SparkIO:
    """Reads any URI Spark reads (``s3://``, ``hdfs:``, ``file:``) through a SparkSession.

    Only small things reach the driver: two components per row, the error rows
    (at most ``limit``) and a few thumbnails' bytes.
    """

    def __init__(self, spark) -> None:
        self.spark = spark

    def exists(self, uri: str) -> bool:
        from stages import hadoopfs

        return hadoopfs.exists(self.spark, uri)

    def read_bytes(self, uri: str) -> bytes:
        from stages import hadoopfs

        return hadoopfs.read_bytes(self.spark, uri)

    def image_bytes(self, uri: str) -> Optional[bytes]:
        from stages import hadoopfs

        try:
            return hadoopfs.read_bytes(self.spark, uri)
        except Exception:  # Py4JJavaError (no such file, access denied): skip it
            return None

    def projections(self, uri: str) -> Tuple[List[str], List[str], np.ndarray]:
        from pyspark.sql import functions as F

        rows = (
            self.spark.read.parquet(uri)
            .select("path", "label", F.slice("pca", 1, 2).alias("pc"))
            .collect()
        )
        m = min((len(r["pc"]) for r in rows), default=0)
        pcs = np.array([r["pc"][:m] for r in rows], dtype=np.float64).reshape(len(rows), m)
        return [r["path"] for r in rows], [r["label"] for r in rows], pcs

    def errors(self, uri: str, limit: int) -> Tuple[List[Tuple[str, str, str]], Dict[str, int]]:
        from pyspark.sql import functions as F

        bad = self.spark.read.parquet(uri).where(F.col("error").isNotNull())
        counts = {r["label"]: int(r["count"]) for r in bad.groupBy("label").count().collect()}
        rows = bad.select("path", "label", "error").orderBy("path").limit(limit).collect()
        return [(r["path"], r["label"], r["error"]) for r in rows], counts

    def write_bytes(self, uri: str, data: bytes) -> str:
        from stages import hadoopfs

        hadoopfs.write_bytes(self.spark, uri, data)
        return uri


# ---------------------------------------------------------------------------- data


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
    paths, labels : list of str, length n_samples
    pcs : ndarray of shape (n_samples, min(k, 2))
        The first two principal components of each row.
    errors : list of (path, label, reason), or None when the features were not reachable
    error_counts : dict
        Error rows per class (all of them, ``errors`` may be cut at ``MAX_ERROR_ROWS``).
    thumbnails : dict
        Class -> list of ``(path, data URI)``.
    notes : list of str
        What the page could not show, and why.
    """

    results: str
    summary: Dict[str, Any]
    explained_variance_ratio: np.ndarray
    paths: List[str]
    labels: List[str]
    pcs: np.ndarray
    errors: Optional[List[Tuple[str, str, str]]] = None
    error_counts: Dict[str, int] = field(default_factory=dict)
    thumbnails: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        """Number of components kept."""
        return int(self.summary["k"])

    def class_counts(self) -> Dict[str, int]:
        """Rows in the PCA per class, by class name."""
        return dict(sorted(Counter(self.labels).items()))


def _io_for(results: str, spark) -> Any:
    if spark is not None:
        return _SparkIO(spark)
    if local_path(results) is None:
        raise UsageError(
            f"RESULTS {results} is not a local path: copy it first "
            f"(`aws s3 cp --recursive {results} Results/`, then `fruits-pipeline report Results`) "
            "or call stages.report.write_report(results, spark=spark)"
        )
    return _LocalIO()


def _read_summary(io_: Any, base: str, results: str) -> Dict[str, Any]:
    uri = f"{base}/summary.json"
    if not io_.exists(uri):
        raise UsageError(f"{results} has no summary.json, so it is not a RESULTS folder: {_HOW}")
    try:
        summary = json.loads(io_.read_bytes(uri).decode("utf-8"))
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


def _read_ratio(io_: Any, base: str, results: str) -> np.ndarray:
    uri = f"{base}/pca_model/arrays.npz"
    if not io_.exists(uri):
        raise UsageError(f"{results} has no pca_model/arrays.npz: {_HOW}")
    try:
        with np.load(io.BytesIO(io_.read_bytes(uri))) as z:
            return np.asarray(z["explained_variance_ratio"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(
            f"{uri} is not a PCA model ({exc}): re-run `fruits-pipeline reduce` with --overwrite"
        ) from None


def _read_projections(io_: Any, base: str, results: str) -> Tuple[List[str], List[str], np.ndarray]:
    uri = f"{base}/projections"
    if not io_.exists(uri):
        raise UsageError(f"{results} has no projections/: {_HOW}")
    try:
        return io_.projections(uri)
    except UsageError:
        raise
    except Exception as exc:  # pyarrow's and Spark's errors for a bad table differ
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{uri} is not a projections table ({first[:200]}): "
            "re-run `fruits-pipeline reduce` with --overwrite"
        ) from None


def _features_uri(summary: Dict[str, Any]) -> Optional[str]:
    featurize = summary.get("featurize") or {}
    return featurize.get("output") or summary.get("features")


def _read_errors(io_: Any, data: ReportData, base: str) -> None:
    features = _features_uri(data.summary)
    if not features:
        data.notes.append("summary.json names no features Parquet: error rows not shown.")
        return
    candidates = [features]
    if local_path(features) is not None and not os.path.isabs(local_path(features) or ""):
        # A relative path was relative to where the run started; try beside RESULTS too.
        candidates.append(os.path.join(os.path.dirname(base), os.path.basename(features)))
    for uri in candidates:
        try:
            if not io_.exists(uri):
                continue
            data.errors, data.error_counts = io_.errors(uri, MAX_ERROR_ROWS)
            return
        except Exception as exc:  # unreadable or not a features table: say so, go on
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            data.notes.append(f"could not read error rows from {uri}: {first[:200]}")
            return
    how = (
        "" if isinstance(io_, _SparkIO) else " (an s3:// path needs write_report(..., spark=spark))"
    )
    data.notes.append(f"features {features} not reachable from here{how}: error rows not shown.")


def _thumbnail(data: bytes, px: int) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale, much faster
            img = img.convert("RGB")
            img.thumbnail((px, px))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _read_thumbnails(io_: Any, data: ReportData, per_class: int) -> None:
    by_class: Dict[str, List[str]] = {}
    for p, label in zip(data.paths, data.labels):
        by_class.setdefault(label, []).append(p)
    skipped: List[str] = []
    for label in sorted(by_class):
        shown = []
        for p in sorted(by_class[label])[:per_class]:
            raw = io_.image_bytes(p)
            uri = _thumbnail(raw, THUMBNAIL_PX) if raw else None
            if uri is None:
                skipped.append(p)
            else:
                shown.append((p, uri))
        data.thumbnails[label] = shown
    if skipped:
        data.notes.append(
            f"{len(skipped)} thumbnail(s) skipped: image not readable from here "
            f"(e.g. {skipped[0]}); copy the images locally or pass a SparkSession."
        )


def load_results(
    results: str, spark=None, thumbnails_per_class: int = THUMBNAILS_PER_CLASS
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

    Raises
    ------
    UsageError
        ``results`` is missing, is not a RESULTS folder, or is remote without ``spark``.
    """
    io_ = _io_for(results, spark)
    base = results.rstrip("/") or "/"
    if not io_.exists(base):
        raise UsageError(f"RESULTS {results} does not exist: {_HOW}")
    summary = _read_summary(io_, base, results)
    ratio = _read_ratio(io_, base, results)
    paths, labels, pcs = _read_projections(io_, base, results)
    data = ReportData(results, summary, ratio, paths, labels, pcs)
    _read_errors(io_, data, base)
    if thumbnails_per_class > 0:
        _read_thumbnails(io_, data, thumbnails_per_class)
    return data


# ---------------------------------------------------------------------------- figures


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
            label=f"{name} ({int(rows.sum())})",
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


def _figures(data: ReportData) -> Tuple[str, Optional[str]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = (data.summary.get("requested") or {}).get("variance")
    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)
    plot_explained_variance(fig.add_subplot(), data.explained_variance_ratio, data.k, target)
    variance = _png(fig)
    if data.pcs.shape[0] == 0 or data.pcs.shape[1] == 0:
        return variance, None
    n_classes = len(set(data.labels))
    ncol = _legend_columns(n_classes)
    # Tall enough for LEGEND_ROWS legend entries (x-small: about 0.17 inch each).
    fig = Figure(figsize=(7.5 + 2.2 * ncol, max(6.0, 1.0 + min(n_classes, LEGEND_ROWS) * 0.17)))
    FigureCanvasAgg(fig)
    plot_projection(fig.add_subplot(), data.pcs, data.labels, data.explained_variance_ratio)
    return variance, _png(fig)


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; height: auto; }
img.thumb { width: 64px; height: 64px; object-fit: contain; margin-right: 4px;
            border: 1px solid #eee; }
.note { color: #8a5a00; } .ok { color: #1a7f37; } .off { color: #b42318; font-weight: bold; }
code { font-size: .92em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e("-" if value is None else value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3e}"
    return f"{value:.6g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>{head}<tbody>{body}</tbody></table>"


def _td(value: Any, num: bool = False) -> str:
    return f'<td class="num">{_num(value)}</td>' if num else f"<td>{_e(value)}</td>"


def _overview(data: ReportData) -> str:
    s = data.summary
    model = s.get("features_model") or {}
    requested = s.get("requested") or {}
    cum = float(s.get("cumulative_explained_variance") or 0.0)
    how = (
        f"--k {requested['k']}"
        if requested.get("k") is not None
        else f"--variance {requested.get('variance')}"
    )
    rows = [
        ("RESULTS", _td(data.results)),
        ("features", _td(_features_uri(s) or "-")),
        ("rows in the PCA", _td(s.get("rows"), True)),
        ("error rows (skipped)", _td(s.get("error_rows"), True)),
        ("classes", _td(len(set(data.labels)), True)),
        ("features per image", _td(s.get("n_features", data.explained_variance_ratio.size), True)),
        ("components kept (k)", f'<td class="num">{data.k} ({_e(how)})</td>'),
        ("explained variance at k", f'<td class="num">{cum:.2%}</td>'),
        (
            "features model",
            _td(
                f"{model.get('name', '?')} alpha {model.get('alpha', '?')}, "
                f"{model.get('input_size', '?')} px, weights {model.get('weights_source', '?')}"
                if model
                else "-"
            ),
        ),
    ]
    return _table([], [[f"<th>{_e(k)}</th>", v] for k, v in rows], "overview")


def _classes_section(data: ReportData) -> str:
    counts = data.class_counts()
    names = sorted(set(counts) | set(data.error_counts))
    rows = []
    for name in names:
        thumbs = "".join(
            f'<img class="thumb" src="{uri}" alt="{_e(p)}" title="{_e(p)}">'
            for p, uri in data.thumbnails.get(name, [])
        )
        rows.append(
            [
                f'<td class="class-name">{_e(name)}</td>',
                _td(counts.get(name, 0), True),
                _td(data.error_counts.get(name, 0) if data.errors is not None else "-", True),
                f"<td>{thumbs}</td>",
            ]
        )
    total_errors = sum(data.error_counts.values()) if data.errors is not None else "-"
    rows.append(
        ["<th>total</th>", _td(sum(counts.values()), True), _td(total_errors, True), "<td></td>"]
    )
    return _table(["class", "rows in the PCA", "error rows", "sample images"], rows, "classes")


def _errors_section(data: ReportData) -> str:
    if data.errors is None:
        return '<p class="note">Error rows not available (see the notes below).</p>'
    total = sum(data.error_counts.values())
    if total == 0:
        return "<p>No error rows: every image was decoded and featurized.</p>"
    rows = [
        [f"<td><code>{_e(p)}</code></td>", _td(label), _td(reason)]
        for p, label, reason in data.errors
    ]
    more = (
        f'<p class="note">Showing {len(data.errors)} of {total} error rows.</p>'
        if total > len(data.errors)
        else ""
    )
    return (
        f"<p>{total} image(s) could not be featurized; they are not in the PCA.</p>"
        + _table(["path", "class", "reason"], rows, "errors")
        + more
    )


def _timings_section(data: ReportData) -> str:
    timings = data.summary.get("timings_s") or {}
    rows = [
        [_td(_TIMING_NAMES.get(key, key)), f'<td class="num">{value:.2f}</td>']
        for key, value in timings.items()
        if isinstance(value, (int, float))
    ]
    out = _table(["stage", "seconds"], rows, "timings") if rows else "<p>No timings recorded.</p>"
    feat = data.summary.get("featurize")
    if feat:
        rate = float(feat.get("images_per_second") or float("nan"))
        out += (
            f"<p>featurize: {_num(feat.get('images'))} images in {_num(feat.get('partitions'))} "
            f"tasks, {rate:.1f} images/s, {_num(feat.get('model_builds'))} model builds.</p>"
        )
    return out


def _check_section(data: ReportData) -> str:
    check = data.summary.get("spark_ml_check")
    if not check:
        return (
            "<p>Not run (pass <code>--check spark-ml</code> to <code>reduce</code> "
            "or <code>run</code>).</p>"
        )
    if check.get("spark_ml_valid") is False:
        # Spark's answer failed its own consistency test: there is nothing to compare.
        reason = check.get("spark_ml_invalid") or "Spark ML's PCA returned invalid components"
        return (
            f'<p class="spark-ml-invalid"><span class="off">not compared</span>: {_e(reason)}. '
            f"Spark's LAPACK: {_e(check.get('spark_lapack', 'unknown'))} (a native LAPACK, "
            "e.g. Debian's libopenblas0, avoids it).</p>"
        )
    rows = []
    for key, value in check.items():
        bound = _CHECK_BOUNDS.get(key)
        status = ""
        if bound is not None and isinstance(value, (int, float)):
            op, limit, text = bound
            ok = value <= limit if op == "<=" else value >= limit
            word, cls = ("ok", "ok") if ok else ("OUTSIDE", "off")
            status = f'<span class="{cls}">{word} ({_e(op)} {text})</span>'
        if isinstance(value, float) and 0.999 < value < 1.0:  # |cos|: show how far from 1
            shown = f'<td class="num">1 - {1.0 - value:.1e}</td>'
        else:
            shown = _td(value, True)
        rows.append([_td(key), shown, f"<td>{status}</td>"])
    return (
        "<p>Spark ML <code>StandardScaler(withMean, withStd) + PCA</code> fitted on the same rows "
        "and compared with this PCA.</p>" + _table(["figure", "value", "bound"], rows, "spark-ml")
    )


def render_html(data: ReportData) -> str:
    """The report page of ``data``: one HTML document, every image a ``data:`` URI."""
    variance_png, scatter_png = _figures(data)
    s = data.summary
    scatter = (
        f'<img class="figure" src="{scatter_png}" alt="PC1 x PC2 scatter of '
        f'{len(data.labels)} rows in {len(set(data.labels))} classes">'
        if scatter_png
        else '<p class="note">No projections to draw.</p>'
    )
    notes = "".join(f'<li class="note">{_e(n)}</li>' for n in data.notes)
    sections = [
        ("overview", "Overview", _overview(data)),
        (
            "variance",
            "Explained variance",
            f'<img class="figure" src="{variance_png}" alt="cumulative explained variance, '
            f'k = {data.k}">',
        ),
        ("projection", "PC1 x PC2", scatter),
        ("classes", "Classes", _classes_section(data)),
        ("errors", "Error rows", _errors_section(data)),
        ("timings", "Timings", _timings_section(data)),
        ("spark-ml-check", "Spark ML cross-check", _check_section(data)),
    ]
    if notes:
        sections.append(("notes", "Notes", f"<ul>{notes}</ul>"))
    body = "\n".join(f'<section id="{i}"><h2>{_e(t)}</h2>\n{c}\n</section>' for i, t, c in sections)
    title = f"fruits-pipeline report: {s.get('rows')} rows, k = {data.k}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def write_report(
    results: str,
    out: Optional[str] = None,
    spark=None,
    thumbnails_per_class: int = THUMBNAILS_PER_CLASS,
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

    Returns
    -------
    str
        The report's path (local) or URI.

    Raises
    ------
    UsageError
        Missing or invalid RESULTS, or a remote one without ``spark``.
    """
    data = load_results(results, spark, thumbnails_per_class)
    page = render_html(data).encode("utf-8")
    if out is None:
        out = results.rstrip("/") + "/report.html"
    io_ = _SparkIO(spark) if spark is not None else _LocalIO()
    return io_.write_bytes(out, page)
