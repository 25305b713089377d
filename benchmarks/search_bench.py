"""Search index: query latency and throughput of exact vs HNSW search, recall, vote accuracy.

Part 1 (synthetic rows shaped like PCA scores: 500 clusters, component scales decaying
as 1/sqrt(j)): for each size, the warm latency of one query (p50/p95) and the
throughput (queries answered one at a time, and 1000 at once) of

- the baseline: numpy brute force, ``np.linalg.norm(X - q, axis=1)`` then a full sort;
- ``exact``: :class:`stages.search.query.VectorIndex` without a graph (one GEMV + float64 re-rank);
- ``hnsw``: the same with the faiss HNSW graph (sizes >= ``--hnsw-from``), its build time
  and its recall@10 against exact.

Part 2 (real): the 1000 shared images featurized with the bundled weights, reduced
(variance 0.95) and indexed; leave-one-out: each image queries the index with itself left
out, the 10 nearest vote.  Also the end-to-end latency of one photo (decode + model + PCA +
search) in process.

    python benchmarks/search_bench.py              # 1k, 4099, 100k, 1M rows + the real set
    python benchmarks/search_bench.py --quick      # 1k, 4099, 100k + the real set
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, ROOT, quiet_env
from benchmarks._table import Col, pyplot, records_table, save_figure

SHARED = ROOT.parent / "shared" / "data" / "fruits360"


def synthetic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """``n`` rows of ``d`` PCA-like scores (clustered, decaying scales), float32."""
    rng = np.random.default_rng(seed)
    scale = 10.0 * np.arange(1, d + 1) ** -0.5
    centres = rng.normal(size=(500, d)) * scale
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s : s + m] = centres[rng.integers(500, size=m)] + rng.normal(size=(m, d)) * scale * 0.5
    return out


def _latencies(fn, queries: np.ndarray) -> Dict[str, float]:
    fn(queries[0])  # warm
    ts = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        ts.append(time.perf_counter() - t)
    ts_ms = np.array(ts) * 1e3
    return {
        "p50_ms": float(np.percentile(ts_ms, 50)),
        "p95_ms": float(np.percentile(ts_ms, 95)),
        "qps_one_at_a_time": float(len(ts) / np.sum(ts)),
    }


def _batch_qps(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    fn(queries)
    return float(len(queries) / (time.perf_counter() - t))


def bench_size(n: int, d: int, n_queries: int, hnsw: bool) -> Dict[str, Any]:
    """Latency, throughput (and recall, build time) at ``n`` rows."""
    from linalg.vectors import VectorIndex, build_hnsw

    X = synthetic(n, d)
    rng = np.random.default_rng(1)
    # Queries near the data but not rows of it: a row plus noise at the clusters' spread.
    scale = (10.0 * np.arange(1, d + 1) ** -0.5 * 0.5).astype(np.float32)
    picks = rng.integers(n, size=max(n_queries, 1000))
    Q = X[picks] + rng.normal(size=(len(picks), d)).astype(np.float32) * scale
    out: Dict[str, Any] = {"rows": n, "dims": d, "queries": n_queries}

    def baseline(q):
        dist = np.linalg.norm(X - q, axis=1)
        return np.argsort(dist)[:10]

    out["baseline"] = _latencies(baseline, Q[:n_queries])
    exact = VectorIndex(X)
    out["exact"] = _latencies(lambda q: exact.search(q, 10), Q[:n_queries])
    out["exact"]["qps_batch_1000"] = _batch_qps(lambda q: exact.search(q, 10), Q[:1000])
    out["exact"]["speedup_vs_baseline_p50"] = out["baseline"]["p50_ms"] / out["exact"]["p50_ms"]
    if hnsw:
        t = time.perf_counter()
        graph = build_hnsw(X)
        build = time.perf_counter() - t
        approx = VectorIndex(X, graph)
        out["hnsw"] = _latencies(lambda q: approx.search(q, 10), Q[:n_queries])
        out["hnsw"]["qps_batch_1000"] = _batch_qps(lambda q: approx.search(q, 10), Q[:1000])
        out["hnsw"]["build_s"] = build
        e_ids, _ = exact.search(Q[:1000], 10)
        a_ids, _ = approx.search(Q[:1000], 10)
        out["hnsw"]["recall_at_10"] = float(
            np.mean([len(set(a) & set(e)) / 10 for a, e in zip(a_ids, e_ids)])
        )
        out["hnsw"]["speedup_vs_exact_p50"] = out["exact"]["p50_ms"] / out["hnsw"]["p50_ms"]
        out["hnsw"]["speedup_vs_baseline_p50"] = out["baseline"]["p50_ms"] / out["hnsw"]["p50_ms"]
    return out


def bench_real(images: Path, workdir: Path, n_latency: int = 100) -> Dict[str, Any]:
    """Leave-one-out vote accuracy and end-to-end latency on real images."""
    from stages.base.session import spark_session
    from stages.featurize import featurize
    from stages.reduce import reduce_features
    from stages.search.query import QueryEngine, SearchIndex, vote

    results = workdir / "Results"
    spark = spark_session(
        "search-bench", master="local[2]", conf={"spark.ui.showConsoleProgress": "false"}
    )
    try:
        featurize(spark, str(images), str(workdir / "Features"), weights="bundled", overwrite=True)
        reduce_features(
            spark, str(workdir / "Features"), str(results), variance=0.95, overwrite=True
        )
    finally:
        spark.stop()
    index = SearchIndex(str(results))
    n = len(index)
    all_labels = [index.label(i) for i in range(n)]
    ids, dist = index.vectors.search(index.rows.take(np.arange(n)), 11, exact=True)
    right = {1: 0, 5: 0, 10: 0}
    close = 0
    wrong: List[Dict[str, Any]] = []
    for i in range(n):
        keep = ids[i] != i
        nb, nd = ids[i][keep][:10], dist[i][keep][:10]
        labels = [all_labels[j] for j in nb]
        for top in right:
            right[top] += vote(labels[:top], nd[:top])["label"] == all_labels[i]
        close += bool(nd[0] <= index.meta["no_match_distance"])
        if vote(labels, nd)["label"] != all_labels[i] and len(wrong) < 20:
            wrong.append({"label": all_labels[i], "vote": vote(labels, nd)})
    engine = QueryEngine(str(results))
    photos = sorted(images.rglob("*.jpg"))[:: max(1, n // n_latency)][:n_latency]
    blobs = [p.read_bytes() for p in photos]
    lat = _latencies(lambda b: engine.similar_bytes(b), blobs)
    return {
        "images": n,
        "k": index.meta["dims"],
        "classes": len(set(all_labels)),
        "leave_one_out_vote_accuracy": {f"top{t}": right[t] / n for t in right},
        "close_match_rate": close / n,
        "no_match_distance": index.meta["no_match_distance"],
        "neighbour_distance": index.meta["neighbour_distance"],
        "some_wrong_votes": wrong,
        "end_to_end_one_photo": lat,
    }


def _p50_p95(m: Dict[str, Any], digits: int) -> str:
    return f"{m['p50_ms']:.{digits}f} / {m['p95_ms']:.{digits}f} ms"


def _qps(m: Dict[str, Any]) -> str:
    return f"{m['qps_one_at_a_time']:.0f} / {m['qps_batch_1000']:.0f}"


def _hnsw(fn):
    """A cell of the HNSW index, ``—`` for sizes below ``--hnsw-from``."""
    return lambda r: fn(r["hnsw"]) if r.get("hnsw") else "—"


# One row per indexed size (``bench_size``).
COLS = [
    Col("rows", lambda r: f"{r['rows']:,}"),
    Col("numpy brute force p50 / p95", lambda r: _p50_p95(r["baseline"], 2)),
    Col("exact p50 / p95", lambda r: _p50_p95(r["exact"], 3)),
    Col("exact QPS (1 / batch)", lambda r: _qps(r["exact"])),
    Col("HNSW p50 / p95", _hnsw(lambda h: _p50_p95(h, 3))),
    Col("HNSW QPS (1 / batch)", _hnsw(_qps)),
    Col("HNSW recall@10", _hnsw(lambda h: f"{h['recall_at_10']:.3f}")),
    Col("HNSW build", _hnsw(lambda h: f"{h['build_s']:.1f} s")),
    Col("exact / HNSW", _hnsw(lambda h: f"{h['speedup_vs_exact_p50']:.1f}x")),
]


def _table(rows: List[Dict[str, Any]]) -> str:
    return records_table(COLS, rows)


def _plot(rows: List[Dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["rows"] for r in rows]
    ax.loglog(n, [r["baseline"]["p50_ms"] for r in rows], "o-", label="numpy brute force")
    ax.loglog(n, [r["exact"]["p50_ms"] for r in rows], "s-", label="exact (GEMV + re-rank)")
    hn = [r for r in rows if "hnsw" in r]
    if hn:
        ax.loglog([r["rows"] for r in hn], [r["hnsw"]["p50_ms"] for r in hn], "^-", label="HNSW")
    ax.set_xlabel("indexed rows")
    ax.set_ylabel("p50 latency of one query (ms, warm)")
    ax.set_title(f"top-10 search, {rows[0]['dims']} dims, 2 cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark, print the tables, write ``results/<stem>.json|png``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1k, 4099, 100k rows only")
    p.add_argument("--sizes", default=None, help="comma-separated row counts")
    p.add_argument("--dims", type=int, default=256, help="dimensions of the synthetic rows")
    p.add_argument("--queries", type=int, default=300, help="single queries timed per size")
    p.add_argument("--hnsw-from", type=int, default=100_000, help="also build HNSW from this n")
    p.add_argument("--images", default=str(SHARED), help="real images for part 2 ('' to skip)")
    p.add_argument("--workdir", default="/tmp/fruits-bench-search")
    p.add_argument("--stem", default=None, help="results/<stem>.json|png")
    args = p.parse_args(argv)
    quiet_env()
    sizes = [int(s) for s in (args.sizes or "1000,4099,100000,1000000").split(",")]
    if args.quick and args.sizes is None:
        sizes = [1000, 4099, 100_000]
    stem = args.stem or ("search_quick" if args.quick else "search")
    rows = []
    for n in sizes:
        print(f"search_bench: {n} rows ...", file=sys.stderr, flush=True)
        rows.append(bench_size(n, args.dims, args.queries, n >= args.hnsw_from))
    out: Dict[str, Any] = {"command": " ".join(sys.argv), "synthetic": rows}
    print(_table(rows))
    if args.images and Path(args.images).is_dir():
        print("search_bench: real images ...", file=sys.stderr, flush=True)
        real = bench_real(Path(args.images), Path(args.workdir))
        out["real"] = real
        acc = real["leave_one_out_vote_accuracy"]
        e2e = real["end_to_end_one_photo"]
        print(
            f"\nleave-one-out on {real['images']} real images ({real['classes']} classes, "
            f"k={real['k']}): vote of the 10 nearest {acc['top10']:.3f}, 5 nearest "
            f"{acc['top5']:.3f}, nearest {acc['top1']:.3f}; "
            f"close match {real['close_match_rate']:.3f}"
            f"\none photo end to end (decode + model + PCA + search): p50 {e2e['p50_ms']:.1f} ms, "
            f"p95 {e2e['p95_ms']:.1f} ms"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(out, indent=2))
    _plot(rows, RESULTS_DIR / f"{stem}.png")
    print(f"\nwrote benchmarks/results/{stem}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
