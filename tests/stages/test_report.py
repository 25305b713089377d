"""The HTML report: built from a real RESULTS, self-contained, and every image loads in
headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from stages import report
from stages.base.errors import UsageError
from tests.chromium import Chromium, needs_chromium
from tests.conftest import SAMPLE

# Written into the DOM once the page has loaded: what the browser made of each image.
IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(imgs.map(function (im) {
    return {alt: im.alt, complete: im.complete, width: im.naturalWidth, height: im.naturalHeight};
  }));
  document.body.appendChild(out);
});
</script>
"""


class Page(HTMLParser):
    """Tags' attributes, and the text of each table row by table class."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: List[Tuple[str, Dict[str, str]]] = []
        self.tables: Dict[str, List[List[str]]] = {}
        self._table = ""
        self._row: List[str] = []
        self._cell: List[str] = []
        self._in_cell = False
        self.notes: List[str] = []
        self._note: List[str] = []
        self._in_note = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "table":
            self._table = a.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell, self._in_cell = [], True
        elif tag == "li":
            self._note, self._in_note = [], True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append("".join(self._cell).strip())
            self._in_cell = False
        elif tag == "tr" and self._table:
            self.tables[self._table].append(self._row)
        elif tag == "table":
            self._table = ""
        elif tag == "li":
            self.notes.append("".join(self._note).strip())
            self._in_note = False

    def handle_data(self, data):
        if self._in_cell:
            self._cell.append(data)
        if self._in_note:
            self._note.append(data)

    def images(self, cls: str = "") -> List[Dict[str, str]]:
        return [a for t, a in self.tags if t == "img" and (not cls or a.get("class") == cls)]

    def table(self, cls: str) -> List[List[str]]:
        """Body rows (the header row dropped)."""
        return self.tables[cls][1:]


def _decode(data_uri: str):
    from PIL import Image

    head, payload = data_uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return Chromium(["--hide-scrollbars", *args], capture=True).communicate(timeout=120)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def results_dir(spark, sample_features, tmp_path_factory) -> Path:
    """A real RESULTS of the bundled sample: k=5, with the Spark ML cross-check."""
    from stages.reduce import reduce_features

    out = tmp_path_factory.mktemp("report") / "Results"
    # variance=None: reduce_features' default variance=0.95 conflicts with k.
    reduce_features(spark, str(sample_features), str(out), k=5, variance=None, check="spark-ml")
    return out


@pytest.fixture(scope="module")
def built(results_dir, tmp_path_factory) -> Tuple[Path, str]:
    """The report of ``results_dir`` (path, text)."""
    out = report.write_report(str(results_dir), str(tmp_path_factory.mktemp("html") / "r.html"))
    return Path(out), Path(out).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/a/Apple Braeburn/1.jpg", "/a/Apple Braeburn/1.jpg"),
        ("rel/x", "rel/x"),
        ("file:/a/b.jpg", "/a/b.jpg"),
        ("file:///a/b.jpg", "/a/b.jpg"),
        ("file://localhost/a/b.jpg", "/a/b.jpg"),
        ("s3://bucket/Test/Kiwi/1.jpg", None),
        ("s3a://bucket/x", None),
    ],
)
def test_local_path(uri, expected):
    assert report.local_path(uri) == expected


def test_missing_results_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"does not exist: give the folder written by"):
        report.write_report(str(tmp_path / "nowhere"))


def test_folder_without_summary_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"has no summary.json, so it is not a RESULTS folder"):
        report.write_report(str(tmp_path))


def test_invalid_summary_is_a_usage_error(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"summary.json is not valid JSON .*--overwrite"):
        report.write_report(str(tmp_path))


def test_summary_without_k_is_a_usage_error(tmp_path):
    (tmp_path / "summary.json").write_text('{"rows": 3}')
    with pytest.raises(UsageError, match=r"summary.json has no k: it was not written by"):
        report.write_report(str(tmp_path))


def test_remote_results_without_spark_is_a_usage_error():
    with pytest.raises(UsageError, match=r"not a local path: copy it first \(`aws s3 cp"):
        report.write_report("s3://bucket/Results/")


def test_cli_report_error_is_one_line(tmp_path, capsys):
    from stages.cli import main

    code = main(["report", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fruits-pipeline: error: RESULTS ")


def test_plot_projection_legend_names_every_class():
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    labels = ["Kiwi"] * 3 + ["Apple Braeburn"] * 2 + ["Banana"] * 4
    ax = Figure().add_subplot()
    classes = report.plot_projection(ax, rng.normal(size=(9, 2)), labels, ratio=[0.5, 0.25])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert classes == ["Apple Braeburn", "Banana", "Kiwi"]
    assert texts == ["Apple Braeburn (2)", "Banana (4)", "Kiwi (3)"]
    assert ax.get_xlabel() == "PC1 (50.0% of variance)"


def test_plot_projection_many_classes_get_distinct_styles():
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    labels = [f"class {i:03d}" for i in range(131) for _ in range(2)]
    ax = Figure().add_subplot()
    report.plot_projection(ax, np.zeros((len(labels), 2)), labels)
    styles = {
        (to_hex(c.get_facecolor()[0]), c.get_paths()[0].vertices.round(3).tobytes())
        for c in ax.collections
    }
    assert len(ax.collections) == 131
    assert len(styles) == 131


def test_plot_explained_variance_marks_k():
    from matplotlib.figure import Figure

    ratio = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    ax = Figure().add_subplot()
    report.plot_explained_variance(ax, ratio, k=2, target=0.8)
    cum = ax.get_lines()[0].get_ydata()
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    np.testing.assert_allclose(cum, np.cumsum(ratio))
    assert "k = 2: 80.0%" in texts and "target 80%" in texts


@pytest.mark.parametrize(
    ("counts", "bound", "expected"),
    [
        ({"a": 3, "b": 5}, 10, {"a": 3, "b": 5}),  # under the bound: every row
        ({"a": 2, "b": 50, "c": 60}, 20, {"a": 2, "b": 9, "c": 9}),  # small class whole
        ({"a": 2, "b": 50, "c": 60}, 21, {"a": 2, "b": 10, "c": 9}),  # remainder by name
        ({"a": 5, "b": 5, "c": 5}, 2, {"a": 1, "b": 1, "c": 0}),
    ],
)
def test_sample_quotas(counts, bound, expected):
    from stages.report.rows import quotas

    assert quotas(counts, bound) == expected


def _tiled(results_dir: Path, out: Path, copies: Dict[str, int]) -> Dict[str, int]:
    """A copy of ``results_dir`` whose projections repeat each class's real rows
    ``copies[class]`` times under new paths (no thumbs); returns the rows per class."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.copytree(results_dir, out)
    real = pq.read_table(out / "projections", columns=["path", "label", "pca"])
    shutil.rmtree(out / "projections")
    (out / "projections").mkdir()
    counts: Dict[str, int] = {}
    for name in sorted(set(real.column("label").to_pylist())):
        rows = real.filter(pc.equal(real.column("label"), name))
        n = copies.get(name, 1)
        tiled = pa.concat_tables([rows] * n)
        copy = np.repeat(np.arange(n), rows.num_rows).astype(str)
        paths = pc.binary_join_element_wise(tiled.column("path"), pa.array(copy), "#")
        pq.write_table(
            tiled.set_column(0, "path", paths), out / "projections" / f"part-{name}.parquet"
        )
        counts[name] = tiled.num_rows
    return counts


@pytest.mark.slow
def test_report_holds_a_bounded_sample_and_exact_counts(results_dir, tmp_path):
    # One class of 10 rows among nine of 3000: more rows than the scatter's bound.
    names = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    counts = _tiled(results_dir, tmp_path / "Results", {n: 300 for n in names[1:]})
    total = sum(counts.values())
    assert total > report.SCATTER_POINTS

    data = report.load_results(str(tmp_path / "Results"), thumbnails_per_class=0)
    ax = report.projection_figure(data).axes[0]
    drawn = sum(len(c.get_offsets()) for c in ax.collections)
    in_sample = Counter(data.labels)
    assert data.counts == counts and data.rows == total
    assert len(data.labels) == drawn == report.SCATTER_POINTS
    assert in_sample[names[0]] == 10  # the small class whole
    assert {in_sample[n] for n in names[1:]} == {2221, 2222}  # the others capped alike
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{n} ({counts[n]})" for n in names]
    page = report.render_html(data)
    assert f"PC1 x PC2 scatter of a sample of 20,000 of {total:,} rows in 10 classes" in page
    assert f"A sample of 20,000 of {total:,} rows, at most 20,000 whatever the size" in page
    rows = Page(page).table("classes")
    assert [(r[0], int(r[1].replace(",", ""))) for r in rows[:-1]] == sorted(counts.items())


# ----------------------------------------------------------------------------- real RESULTS


@pytest.mark.slow
def test_report_is_self_contained(built):
    path, text = built
    page = Page(text)
    urls = [
        (tag, key, value)
        for tag, attrs in page.tags
        for key, value in attrs.items()
        if key in ("src", "href", "srcset", "data", "action", "poster")
    ]
    assert path.name == "r.html"
    assert not [u for u in urls if not u[2].startswith("data:image/")]
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    assert "http://" not in text and "https://" not in text
    assert len(page.images()) == len(urls)  # every URL is an image's data URI


@pytest.mark.slow
def test_report_figures_and_thumbnails_decode(built, results_dir):
    page = Page(built[1])
    figures = page.images("figure")
    thumbs = page.images("thumb")
    sizes = [_decode(a["src"]).size for a in figures]
    k = json.loads((results_dir / "summary.json").read_text())["k"]
    assert [a["alt"] for a in figures][0] == f"cumulative explained variance, k = {k}"
    assert figures[1]["alt"].startswith("PC1 x PC2 scatter of 100 rows in 10 classes")
    assert all(w > 300 and h > 200 for w, h in sizes)
    assert len(thumbs) == 10 * report.THUMBNAILS_PER_CLASS
    assert all(max(_decode(a["src"]).size) == report.THUMBNAIL_PX for a in thumbs)


@pytest.mark.slow
def test_report_counts_per_class_match_projections(built, results_dir):
    import pyarrow.parquet as pq

    labels = pq.read_table(results_dir / "projections", columns=["label"]).column("label")
    expected = sorted(Counter(labels.to_pylist()).items())
    rows = Page(built[1]).table("classes")
    shown = [(r[0], int(r[1].replace(",", ""))) for r in rows[:-1]]
    folders = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    assert shown == expected
    assert [name for name, _ in shown] == folders  # "Apple Braeburn", not "Apple%20Braeburn"
    assert rows[-1][:3] == ["total", "100", "0"]


@pytest.mark.slow
def test_report_shows_timings_and_spark_ml_check(built, results_dir):
    page = Page(built[1])
    timings = dict((r[0], float(r[1])) for r in page.table("timings"))
    assert timings["reduce (stage 2) total"] > 0
    # Spark ML's answer on these 100 rank-deficient rows is valid with a native LAPACK
    # and only sometimes with the pure-Java one: the page must say which, never
    # report a disagreement with an invalid reference.
    summary = json.loads((results_dir / "summary.json").read_text())
    verdict = summary["spark_ml_check"]
    assert "OUTSIDE" not in built[1]
    if verdict["spark_ml_valid"]:
        check = {r[0]: (r[1], r[2]) for r in page.table("spark-ml")}
        assert check["k"] == ("5", "")
        assert check["rows_compared"] == ("100", "")
        bounded = [status for _, status in check.values() if status]
        assert len(bounded) == 3 and all(s.startswith("ok (") for s in bounded)
    else:
        assert "Spark ML&#x27;s PCA returned invalid components" in built[1]


def _with_check(results_dir: Path, tmp_path: Path, check: dict) -> str:
    """The report of a copy of ``results_dir`` whose summary carries ``check``."""
    copy = tmp_path / "Results"
    shutil.copytree(results_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["spark_ml_check"] = check
    (copy / "summary.json").write_text(json.dumps(summary))
    out = report.write_report(str(copy), str(tmp_path / "r.html"))
    return Path(out).read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_says_spark_ml_was_invalid_instead_of_outside(results_dir, tmp_path):
    text = _with_check(
        results_dir,
        tmp_path,
        {
            "k": 5,
            "spark_lapack": "F2jLAPACK",
            "spark_ml_valid": False,
            "spark_ml_invalid": "Spark ML's PCA returned invalid components: its LAPACK SVD "
            "failed on this rank-deficient covariance (component 1 claims 0.06 of the "
            "variance but the data has 0.15 along it)",
        },
    )
    assert "not compared" in text and "component 1 claims 0.06" in text
    assert "F2jLAPACK" in text and "OUTSIDE" not in text
    assert "spark-ml" not in Page(text).tables


@pytest.mark.slow
def test_report_marks_a_figure_beyond_its_bound_outside(results_dir, tmp_path):
    text = _with_check(
        results_dir,
        tmp_path,
        {
            "k": 5,
            "spark_ml_valid": True,
            "explained_variance_ratio_max_rel_err": 3e-6,
            "components_min_abs_cos_well_separated": 1.0,
            "projection_max_abs_diff_over_scale": 1e-12,
        },
    )
    status = {r[0]: r[2] for r in Page(text).table("spark-ml")}
    assert status["explained_variance_ratio_max_rel_err"].startswith("OUTSIDE (")
    assert status["components_min_abs_cos_well_separated"].startswith("ok (")
    assert status["projection_max_abs_diff_over_scale"].startswith("ok (")


@pytest.mark.slow
def test_report_lists_error_rows_from_features(results_dir, sample_features, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = tmp_path / "Features"
    shutil.copytree(sample_features, features)
    schema = pq.read_schema(next(features.glob("part-*.parquet")))
    bad = pa.table(
        {
            "path": ["file:/nowhere/Kiwi/broken.jpg", "file:/nowhere/Banana/empty.jpg"],
            "label": ["Kiwi", "Banana"],
            "features": [None, None],
            "error": ["cannot decode image: OSError: truncated", "empty file (0 bytes)"],
            # FEATURES carry each row's thumbnail; an error row has none.
            **({"thumb": [None, None]} if "thumb" in schema.names else {}),
        },
        schema=schema,
    )
    pq.write_table(bad, features / "part-99999-errors.parquet")
    results = tmp_path / "Results"
    shutil.copytree(results_dir, results)
    summary = json.loads((results / "summary.json").read_text())
    summary["features"] = str(features)
    (results / "summary.json").write_text(json.dumps(summary))

    page = Page(Path(report.write_report(str(results))).read_text(encoding="utf-8"))
    errors = page.table("errors")
    classes = {r[0]: r[2] for r in page.table("classes")}
    assert (results / "report.html").is_file()
    assert errors == [
        ["file:/nowhere/Banana/empty.jpg", "Banana", "empty file (0 bytes)"],
        ["file:/nowhere/Kiwi/broken.jpg", "Kiwi", "cannot decode image: OSError: truncated"],
    ]
    assert (classes["Kiwi"], classes["Banana"], classes["Lemon"], classes["total"]) == (
        "1",
        "1",
        "0",
        "2",
    )


def _features_with_errors(out: Path, errors: int, ok: int = 900) -> Path:
    """A features-shaped folder (3 files, row groups of 400) with ``errors`` error rows in
    shuffled path order, a few paths twice (ties), some row groups without an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    out.mkdir(parents=True)
    is_error = np.r_[np.zeros(ok, bool), np.ones(errors, bool)]  # the first groups: no error
    n = is_error.size
    names = rng.permutation(n).astype(str)
    # Five paths twice (with different reasons), first by path: the order of ties shows.
    names[n - 10 :] = [f"-{j}" for j in range(5)] * 2
    paths = [f"s3://b/Test/{name:>08}.jpg" for name in names]
    table = pa.table(
        {
            "path": paths,
            "label": [f"C{i % 7}" for i in range(n)],
            "features": pa.array(
                [None if e else [1.0] * 4 for e in is_error], pa.list_(pa.float32())
            ),
            "error": [f"cannot decode {i}" if e else None for i, e in enumerate(is_error)],
        }
    )
    for f, part in enumerate(np.array_split(np.arange(n), 3)):
        pq.write_table(table.take(part), out / f"part-{f}.parquet", row_group_size=400)
    (out / "_SUCCESS").touch()
    return out


def _every_error_row(uri: str, limit: int):
    """The report's error rows as they were read before: the whole table, sorted."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    table = pq.read_table(
        uri, columns=["path", "label", "error"], filters=ds.field("error").is_valid()
    )
    counts = dict(Counter(table.column("label").to_pylist()))
    table = table.sort_by("path").slice(0, limit)
    return list(zip(*[table.column(c).to_pylist() for c in ("path", "label", "error")])), counts


# Every pool _peak_arrow_bytes made, kept for the process' life: a buffer Arrow frees
# later (a thread's cache) goes back to the pool it came from, which must still exist.
_POOLS: list = []


def _peak_arrow_bytes(read):
    """``read()`` and the most bytes Arrow held at once during it."""
    import pyarrow as pa

    base = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(base)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        got = read()
    finally:
        pa.set_memory_pool(base)
    return got, pool.max_memory()


def test_error_rows_are_the_first_by_path_with_exact_counts(tmp_path):
    from stages.report.data import _error_rows
    from stages.storage.fs import LocalFileSystem

    uri = str(_features_with_errors(tmp_path / "Features", errors=2 * report.MAX_ERROR_ROWS))
    got = _error_rows(LocalFileSystem(), uri, report.MAX_ERROR_ROWS)
    assert got == _every_error_row(uri, report.MAX_ERROR_ROWS)
    assert len(got[0]) == report.MAX_ERROR_ROWS and sum(got[1].values()) == 1000


def test_error_rows_memory_does_not_grow_with_the_error_rows(tmp_path):
    from stages.report.rows import error_rows_local

    # Ten times the error rows, batches of 256 rows, 50 kept: the same peak, give or take
    # a batch's pages (measured: 105 and 109 kB; read whole, as before: 0.17 and 1.7 MB).
    small = str(_features_with_errors(tmp_path / "small", errors=2_000))
    large = str(_features_with_errors(tmp_path / "large", errors=20_000))
    (rows, counts), peak_small = _peak_arrow_bytes(lambda: error_rows_local(small, 50, 256))
    (_, counts_large), peak_large = _peak_arrow_bytes(lambda: error_rows_local(large, 50, 256))
    assert (rows, counts) == _every_error_row(small, 50)
    assert sum(counts_large.values()) == 20_000
    assert peak_large < 1.5 * peak_small


@pytest.mark.slow
def test_error_rows_through_spark_match_local(spark, tmp_path):
    from stages.report.rows import error_rows_local, error_rows_spark

    uri = str(_features_with_errors(tmp_path / "Features", errors=700))
    rows, counts = error_rows_spark(spark, uri, 50)
    local_rows, local_counts = error_rows_local(uri, 50)
    # Equal paths (the ties) may come in either order from Spark.
    assert (sorted(rows), counts) == (sorted(local_rows), local_counts)


def _projections(results: Path, change) -> None:
    """Rewrite each part of ``results/projections`` as ``change(table)``."""
    import pyarrow.parquet as pq

    for part in (results / "projections").glob("part-*.parquet"):
        pq.write_table(change(pq.read_table(part)), part)


def _thumb_notes(page: Page) -> List[str]:
    return [n for n in page.notes if "thumbnail(s)" in n]


@pytest.mark.slow
def test_report_skips_unreadable_thumbnails_with_a_note(results_dir, tmp_path):
    import pyarrow.compute as pc

    results = tmp_path / "Results"
    shutil.copytree(results_dir, results)

    def old_and_remote(t):  # written before thumbs were kept, photos on S3
        s3 = pc.replace_substring_regex(t.column("path"), r"^file:.*/fruits360/", "s3://b/Test/")
        return t.set_column(0, "path", s3).drop_columns(["thumb"])

    _projections(results, old_and_remote)
    (results / "summary.json").write_text(
        json.dumps({**json.loads((results / "summary.json").read_text()), "features": "s3://b/F/"})
    )

    page = Page(Path(report.write_report(str(results))).read_text(encoding="utf-8"))
    assert page.images("thumb") == []
    assert len(page.images("figure")) == 2
    assert len(page.notes) == 2
    assert page.notes[0].startswith("features s3://b/F/ not reachable from here")
    assert page.notes[1].startswith(
        "40 thumbnail(s) skipped: no thumb in the projections and the image not readable "
        "from here (e.g. s3://b/Test/"
    )


@pytest.mark.slow
def test_report_thumbnails_come_from_thumb_when_the_photos_are_gone(results_dir, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    results = tmp_path / "Results"
    shutil.copytree(results_dir, results)
    gone = tmp_path / "deleted after reduce"  # the photos' folder, no longer there

    def moved(t):
        paths = pc.replace_substring_regex(
            t.column("path"), r"^file:.*/fruits360/", f"file:{gone}/"
        )
        return t.set_column(0, "path", paths)

    _projections(results, moved)
    made = pq.read_table(results / "projections", columns=["path", "thumb"]).to_pydict()
    thumbs = dict(zip(made["path"], made["thumb"]))

    page = Page(Path(report.write_report(str(results))).read_text(encoding="utf-8"))
    shown = page.images("thumb")
    assert not gone.exists()
    assert _thumb_notes(page) == []
    assert len(shown) == 10 * report.THUMBNAILS_PER_CLASS
    for img in shown:
        assert base64.b64decode(img["src"].split(",", 1)[1]) == thumbs[img["alt"]]
    # Each class's first paths, in order.
    by_class: Dict[str, List[str]] = {}
    for p in sorted(thumbs):
        by_class.setdefault(p.rsplit("/", 2)[1], []).append(p)
    expected = [p for name in sorted(by_class) for p in by_class[name][:4]]
    assert [img["alt"] for img in shown] == expected


@pytest.mark.slow
@pytest.mark.parametrize("old", ["no thumb column", "null thumbs in one class"])
def test_report_of_old_results_makes_thumbnails_from_the_photos(results_dir, tmp_path, old):
    import pyarrow as pa
    import pyarrow.compute as pc

    results = tmp_path / "Results"
    shutil.copytree(results_dir, results)

    def without(t):
        if old == "no thumb column":
            return t.drop_columns(["thumb"])
        kiwi = pc.equal(t.column("label"), "Kiwi")
        thumb = pc.if_else(kiwi, pa.nulls(t.num_rows, pa.binary()), t.column("thumb"))
        return t.set_column(t.schema.get_field_index("thumb"), "thumb", thumb)

    _projections(results, without)
    page = Page(Path(report.write_report(str(results))).read_text(encoding="utf-8"))
    opened = 40 if old == "no thumb column" else 4
    assert len(page.images("thumb")) == 10 * report.THUMBNAILS_PER_CLASS
    assert all(max(_decode(a["src"]).size) == report.THUMBNAIL_PX for a in page.images("thumb"))
    assert _thumb_notes(page) == [
        f"{opened} thumbnail(s) made from the photos: their projections rows carry no thumb "
        "(features made before featurize kept thumbnails; `featurize --overwrite` then "
        "`reduce --overwrite` adds them)."
    ]


@pytest.mark.slow
def test_report_through_spark_matches_local(spark, built, results_dir, tmp_path):
    out = report.write_report(str(results_dir), str(tmp_path / "spark.html"), spark=spark)
    via_spark = Page(Path(out).read_text(encoding="utf-8"))
    local = Page(built[1])
    assert via_spark.table("classes") == local.table("classes")
    assert via_spark.images("thumb") == local.images("thumb")
    assert via_spark.table("spark-ml") == local.table("spark-ml")
    # A sample (the bound forced below the rows): the same rows through either reader.
    a = report.load_results(str(results_dir), scatter_points=37)
    b = report.load_results(str(results_dir), spark=spark, scatter_points=37)
    assert len(a.labels) == 37 and a.pcs.shape == (37, 2)
    assert (b.labels, b.counts) == (a.labels, a.counts)
    np.testing.assert_array_equal(b.pcs, a.pcs)


@pytest.mark.slow
def test_cli_report_default_out(results_dir, tmp_path, capsys):
    from stages.cli import main

    results = tmp_path / "Results"
    shutil.copytree(results_dir, results)
    code = main(["report", str(results)])
    err = capsys.readouterr().err
    assert code == 0
    assert err.strip() == f"report: {results}/report.html"
    assert Page((results / "report.html").read_text(encoding="utf-8")).table("classes")
    assert main(["report", str(results), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["report", str(results), "-v"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"fruits-pipeline report {results} -v (log file ")  # DEBUG
    assert err[1:] == [f"report: {results}/report.html"]


@pytest.mark.slow
@needs_chromium
def test_every_image_loads_in_chromium(built, tmp_path):
    path, text = built
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    start = dom.stdout.find('<pre id="image-check">')
    assert start >= 0, dom.stderr[-2000:]
    raw = dom.stdout[start + len('<pre id="image-check">') : dom.stdout.index("</pre>", start)]
    images = json.loads(html.unescape(raw))
    assert len(images) == len(Page(text).images()) == 2 + 10 * report.THUMBNAILS_PER_CLASS
    assert [im["alt"] for im in images if not (im["complete"] and im["width"] > 0)] == []

    shot = tmp_path / "report.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 10  # figures and photos drawn, not a blank page


@pytest.mark.slow
def test_the_featurize_line_says_how_many_workers_built_the_model(results_dir, tmp_path):
    feat = {"images": 100, "partitions": 2, "images_per_second": 28.0, "model_builds": 2}
    pages = {}
    for name, extra in (("new", {"python_workers": 2}), ("old", {})):  # an older summary
        copy = tmp_path / name / "Results"
        shutil.copytree(results_dir, copy)
        summary = json.loads((copy / "summary.json").read_text())
        summary["featurize"] = {**feat, **extra}
        (copy / "summary.json").write_text(json.dumps(summary))
        out = report.write_report(str(copy), str(tmp_path / name / "r.html"))
        pages[name] = Path(out).read_text(encoding="utf-8")
    line = "featurize: 100 images in 2 tasks, 28.0 images/s, 2 model builds"
    assert f"{line} in 2 Python workers.</p>" in pages["new"]
    assert f"{line}.</p>" in pages["old"]
