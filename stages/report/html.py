"""The report page: one self-contained HTML document of a :class:`ReportData`.

Every picture is embedded as a base64 ``data:`` URI: the file can be mailed or
opened offline, it loads nothing from anywhere.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from stages.report.data import ReportData
from stages.report.figures import figure_data_uris

__all__ = ["render_html"]

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
        ("features", _td(data.features or "-")),
        ("rows in the PCA", _td(s.get("rows"), True)),
        ("error rows (skipped)", _td(s.get("error_rows"), True)),
        ("classes", _td(len(data.counts), True)),
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
            f"tasks, {rate:.1f} images/s, {_num(feat.get('model_builds'))} model builds"
            + (
                f" in {_num(feat['python_workers'])} Python workers"
                if feat.get("python_workers") is not None
                else ""
            )
            + ".</p>"
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


def _shown(data: ReportData) -> str:
    n = len(data.labels)
    return f"{n:,} rows" if n == data.rows else f"a sample of {n:,} of {data.rows:,} rows"


def _sample_caption(data: ReportData) -> str:
    """What the scatter shows when it is a sample (the counts per class are exact)."""
    if len(data.labels) == data.rows:
        return ""
    return (
        f'<p class="caption">A sample of {len(data.labels):,} of {data.rows:,} rows, at most '
        f"{data.scatter_points:,} whatever the size: each class up to a common cap (smaller "
        "classes whole, so they stay visible), the same rows on every run (the smallest MD5 "
        "of their path). The legend and the table below count every row.</p>"
    )


def render_html(data: ReportData) -> str:
    """The report page of ``data``: one HTML document, every image a ``data:`` URI."""
    variance_png, scatter_png = figure_data_uris(data)
    s = data.summary
    scatter = (
        f'<img class="figure" src="{scatter_png}" alt="PC1 x PC2 scatter of '
        f'{_shown(data)} in {len(data.counts)} classes">' + _sample_caption(data)
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
