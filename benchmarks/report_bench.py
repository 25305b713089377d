"""What the report's driver holds at 100k ... 1M projection rows: bounded, or every row.

Projections of the shape ``reduce`` writes (``path, label, pca double[50], thumb``;
131 classes of uneven sizes, values random, a 2.5 kB thumb a row, files of 20,000
rows) are generated once per size.  Each reader runs in its own process (its peak
RSS, ``ru_maxrss``, is its own) and draws the scatter to PNG:

- ``every row``: the reader before issue 21's report change, every row's path,
  label and two components on the driver, one point per row;
- ``bounded``: :func:`stages.report.rows.read_local` (exact counts, a sample of at
  most ``SCATTER_POINTS`` rows, four thumbnails a class from ``thumb``).

    .venv/bin/python benchmarks/report_bench.py --quick        # 20k, 100k rows
    .venv/bin/python benchmarks/report_bench.py --sizes 100000,1000000

``--error-rows 100000,1000000`` measures the other list the page holds, FEATURES' error
rows (``path, label, error``; every row an error row, the worst case): read whole and
sorted (the reader before), or :func:`stages.report.rows.error_rows_local` (exact counts,
the first ``MAX_ERROR_ROWS`` by path kept, one batch at a time).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import emit, machine_info, max_rss_mib, run_worker, write_results  # noqa: E402
from benchmarks._table import show_tables, table  # noqa: E402

FILE_ROWS = 20_000
K = 50


def generate(n: int, out: Path) -> None:
    """``n`` projection rows in ``out`` (skipped when already there)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (out / "_SUCCESS").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    classes = [f"Class {i:03d}" for i in range(131)]
    share = rng.pareto(1.5, len(classes)) + 0.05  # a few large classes, many small
    share /= share.sum()
    for f, start in enumerate(range(0, n, FILE_ROWS)):
        m = min(FILE_ROWS, n - start)
        label = rng.choice(len(classes), m, p=share)
        paths = [
            f"s3://bucket/Test/{classes[c]}/r_{i % 977}_100-{i:07d}.jpg"
            for c, i in zip(label, range(start, start + m))
        ]
        offsets = np.arange(0, K * m + 1, K, dtype=np.int32)
        table_ = pa.table(
            {
                "path": paths,
                "label": [classes[c] for c in label],
                "pca": pa.ListArray.from_arrays(offsets, rng.normal(size=K * m)),
                "thumb": pa.array([rng.bytes(2500) for _ in range(m)], pa.binary()),
            }
        )
        pq.write_table(table_, out / f"part-{f:05d}.parquet", use_dictionary=["label"])
    (out / "_SUCCESS").touch()


def generate_errors(n: int, out: Path) -> None:
    """``n`` error rows of FEATURES' shape in ``out`` (skipped when already there)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (out / "_SUCCESS").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(n)  # files not in path order: the reader must sort
    for f, start in enumerate(range(0, n, FILE_ROWS)):
        ids = order[start : start + FILE_ROWS]
        m = len(ids)
        table_ = pa.table(
            {
                "path": [f"s3://bucket/Test/Class {i % 131:03d}/r_{i:08d}_100.jpg" for i in ids],
                "label": [f"Class {i % 131:03d}" for i in ids],
                "features": pa.nulls(m, pa.list_(pa.float32())),
                "error": [
                    f"cannot decode image: OSError: image file is truncated ({i})" for i in ids
                ],
            }
        )
        pq.write_table(table_, out / f"part-{f:05d}.parquet")
    (out / "_SUCCESS").touch()


def error_worker(how: str, uri: str) -> Dict[str, Any]:
    """FEATURES' error rows of ``uri`` read as ``how``; time and peak RSS."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from stages.report.data import MAX_ERROR_ROWS
    from stages.report.rows import error_rows_local

    before = max_rss_mib()
    t0 = time.perf_counter()
    if how == "every row":
        valid = ds.field("error").is_valid()
        t = pq.read_table(uri, columns=["path", "label", "error"], filters=valid)
        total = t.num_rows
        t = t.sort_by("path").slice(0, MAX_ERROR_ROWS)
        listed = len(list(zip(*[t.column(c).to_pylist() for c in ("path", "label", "error")])))
    else:
        rows, counts = error_rows_local(uri, MAX_ERROR_ROWS)
        total, listed = sum(counts.values()), len(rows)
    return {"read_s": time.perf_counter() - t0, "errors": total, "listed": listed,
            "rss_mib": max_rss_mib(), "rss_imports_mib": before}  # fmt: skip


def worker(how: str, uri: str) -> Dict[str, Any]:
    """Read ``uri`` as ``how`` and draw its scatter; times and peak RSS."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from stages.report import plot_projection
    from stages.report.rows import SCATTER_POINTS, _leading_components, read_local

    before = max_rss_mib()
    t0 = time.perf_counter()
    if how == "every row":
        t = pq.read_table(uri, columns=["path", "label", "pca"])
        pcs = _leading_components(pc.list_slice(t.column("pca"), 0, 2).combine_chunks())
        paths, labels, counts = t.column("path").to_pylist(), t.column("label").to_pylist(), None
        del t, paths
    else:
        rows = read_local(uri, SCATTER_POINTS, 4)
        pcs, labels, counts = rows.pcs, rows.labels, rows.counts
    t1 = time.perf_counter()
    fig = Figure(figsize=(14, 8))
    FigureCanvasAgg(fig)
    plot_projection(fig.add_subplot(), pcs, labels, counts=counts)
    fig.savefig(io.BytesIO(), format="png", dpi=100)
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "plot_s": t2 - t1, "points": len(labels),
            "rss_mib": max_rss_mib(), "rss_imports_mib": before}  # fmt: skip


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--quick", action="store_true", help="20k and 100k rows")
    ap.add_argument("--error-rows", help="FEATURES' error rows instead, e.g. 100000,1000000")
    ap.add_argument("--data", default="/tmp/fruits-report-bench")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_generate", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_errors", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        emit((error_worker if args._errors else worker)(*args._worker))
        return
    if args._generate:
        make = generate_errors if args._errors else generate
        make(int(args._generate[0]), Path(args._generate[1]))
        emit({})
        return
    if args.error_rows:
        errors_main(args, argv)
        return
    rows = []
    sizes = "20000,100000" if args.quick else args.sizes
    for n in [int(s) for s in sizes.split(",")]:
        data = Path(args.data) / f"p{n}"
        # In a process of its own: a child's ru_maxrss starts from its parent's peak.
        run_worker(Path(__file__), ["--_generate", str(n), str(data)], data.parent / "gen.log")
        for how in ("every row", "bounded"):
            log = Path(args.data) / "logs" / f"{n}-{how.replace(' ', '_')}.log"
            r = run_worker(Path(__file__), ["--_worker", how, str(data)], log)
            rows.append({"rows": n, "how": how, **r})
    columns = {
        "rows": "rows", "reader": "how", "points": "points", "read s": "read_s",
        "scatter s": "plot_s", "peak RSS MiB": "rss_mib", "of it imports": "rss_imports_mib",
    }  # fmt: skip
    _write(rows, columns, "report_bench_quick" if args.quick else "report_bench", argv)


def _write(rows: List[dict], columns: dict, stem: str, argv: List[str]) -> None:
    """Show ``rows`` as a table (``columns``: header -> key) and write them to ``stem``."""
    tables = [table(list(columns), [[r[k] for k in columns.values()] for r in rows], digits=1)]
    show_tables(tables)
    command = "benchmarks/report_bench.py " + " ".join(argv)
    data = {"machine": machine_info(), "command": command, "rows": rows}
    print(write_results(stem, data, tables))


def errors_main(args, argv: List[str]) -> None:
    """The error rows' readers at each size of ``--error-rows``, each in its own process."""
    rows = []
    for n in [int(s) for s in args.error_rows.split(",")]:
        data = Path(args.data) / f"e{n}"
        gen = ["--_errors", "--_generate", str(n), str(data)]
        run_worker(Path(__file__), gen, data.parent / "gen.log")
        for how in ("every row", "bounded"):
            log = Path(args.data) / "logs" / f"e{n}-{how.replace(' ', '_')}.log"
            r = run_worker(Path(__file__), ["--_errors", "--_worker", how, str(data)], log)
            rows.append({"error_rows": n, "how": how, **r})
    columns = {
        "error rows": "error_rows", "reader": "how", "listed": "listed", "read s": "read_s",
        "peak RSS MiB": "rss_mib", "of it imports": "rss_imports_mib",
    }  # fmt: skip
    _write(rows, columns, "report_bench_errors", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
