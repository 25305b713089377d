"""``reduce``, the search index and the app at 100k ... 1M rows x 1280 features.

The features are generated from real ones: the 1000 shared photos (``../shared``)
are featurized once (bundled weights, LiteRT), then row ``i`` copies real row
``i mod 1000`` (its label, its thumbnail) with its features plus Gaussian noise of
5 % of each feature's spread, and a path of the same shape as the real one
(``.../<Class>/r_12_100-0000042.jpg``).  For each size, in subprocesses of this
script (each its own JVM, so its memory is its own):

- ``reduce FEATURES RESULTS --k 50`` with the index, and without it (``index=False``);
  the wall time, the index step's time, the peak RSS of the driver's Python and of
  its JVM (``local[2]``: the JVM is the executor too);
- the index's size on disk;
- ``fruits-pipeline serve RESULTS``: its RSS once warm, the latency of
  ``POST /api/similar`` with real photos (warm; p50/p95 over ``--queries``), and the
  app's answer for one real photo.

    .venv/bin/python benchmarks/scale_bench.py --quick          # 20k rows
    .venv/bin/python benchmarks/scale_bench.py --sizes 100000,300000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    JSON_MARK,
    MIB,
    RssSampler,
    emit,
    machine_info,
    quiet_env,
    run_worker,
    write_results,
)
from benchmarks._table import show_tables, table  # noqa: E402

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "fruits360"
ROWS_PER_FILE = 20_000
ROW_GROUP = 1024
NOISE = 0.05
K = 50


def _files(n: int) -> int:
    return max(1, -(-n // ROWS_PER_FILE))


# ---------------------------------------------------------------- data


def real_features(work: Path) -> Path:
    """The 1000 shared photos featurized once (cached in ``work``)."""
    out = work / "real" / "Features"
    if (out / "_SUCCESS").exists():
        return out
    from stages.base.session import spark_session
    from stages.featurize import featurize

    spark = spark_session("scale-bench-real", master="local[2]")
    try:
        featurize(spark, str(SHARED_IMAGES), str(out), weights="bundled", overwrite=True)
    finally:
        spark.stop()
    return out


def generate(real: Path, path: Path, n: int, seed: int = 0) -> Dict[str, Any]:
    """``n`` feature rows made from the real ones (see the module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"n": n, "seed": seed, "noise": NOISE, "files": _files(n), "thumbs": True}
    stamp = path / "_bench.json"
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return meta
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    src = pq.read_table(str(real))
    src = src.filter(pa.compute.is_null(src.column("error")))
    schema = pq.read_schema(next(real.glob("*.parquet")))
    if "thumb" not in schema.names:
        raise SystemExit(f"{real} has no thumb column: featurize with this code first")
    feats = np.stack(src.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    spread = feats.std(axis=0) * NOISE
    paths = src.column("path").to_pylist()
    m = len(paths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) % m  # each real row about n/m times, in random order
    start = 0
    for i in range(meta["files"]):
        rows = min(ROWS_PER_FILE, n - start)
        idx = order[start : start + rows]
        X = feats[idx] + spread * rng.standard_normal((rows, feats.shape[1]), dtype=np.float32)
        X = np.maximum(X, 0.0).astype(np.float32)  # ReLU6 features are >= 0
        d = X.shape[1]
        flist = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (rows + 1) * d, d, dtype=np.int32)), pa.array(X.reshape(-1))
        ).cast(schema.field("features").type)
        new_paths = [paths[j][: -len(".jpg")] + f"-{start + r:07d}.jpg" for r, j in enumerate(idx)]
        tbl = pa.table(
            {
                "path": pa.array(new_paths),
                "label": src.column("label").take(pa.array(idx)),
                "features": flist,
                "error": pa.nulls(rows, pa.string()),
                "thumb": src.column("thumb").take(pa.array(idx)),
            }
        ).select(schema.names)
        pq.write_table(tbl.cast(schema), path / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP)
        start += rows
    (path / "_SUCCESS").touch()
    stamp.write_text(json.dumps(meta))
    return meta


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- workers


def worker_reduce(args) -> None:
    """One ``reduce`` (with or without the index) in its own JVM."""
    quiet_env()
    from stages.base.session import spark_session
    from stages.reduce import reduce_features

    spark = spark_session("scale-bench", master="local[2]")
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        summary = reduce_features(
            spark, args.features, args.results, k=K, overwrite=True, index=args.index
        )
        wall = time.perf_counter() - t0
    spark.stop()
    emit(
        {
            "seconds": wall,
            "timings_s": summary["timings_s"],
            "rows": summary["rows"],
            "memory": sampler.result(),
            "index": {
                k: summary.get("index", {}).get(k)
                for k in ("kind", "rows", "recall_at_10", "build_s", "build_steps_s")
            },
        }
    )


def search_only(results: Path, queries: int) -> Dict[str, Any]:
    """The index search alone (no model, no HTTP), in this process: warm p50/p95 of a
    top-10 query at a row's vector plus noise, and the index's load time."""
    import numpy as np

    from stages.search.query import SearchIndex

    t0 = time.perf_counter()
    index = SearchIndex(str(results))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(2)
    rows = rng.choice(len(index), size=queries + 20, replace=False)
    points = index.rows.take(np.sort(rows)).astype(np.float32)
    points += rng.normal(scale=0.05, size=points.shape).astype(np.float32)
    lat = []
    for i, p in enumerate(points):
        t = time.perf_counter()
        index.vectors.search(p[None, :], 10)
        if i >= 20:
            lat.append(time.perf_counter() - t)
    ms = np.array(lat) * 1000
    return {
        "load_s": load_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, data: bytes, top: int = 10) -> Dict[str, Any]:
    import urllib.request

    boundary = "scalebench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/similar?top={top}",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def measure_serve(results: Path, queries: int, log: Path) -> Dict[str, Any]:
    """Start ``serve``, query it with real photos, stop it."""
    import numpy as np
    import psutil

    port = _free_port()
    cli = ROOT / ".venv" / "bin" / "fruits-pipeline"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(cli), "serve", str(results), "--port", str(port)], stdout=fh, stderr=fh
        )
    try:
        t0 = time.perf_counter()
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"serve did not start: see {log}") from None
                time.sleep(0.5)
        start_s = time.perf_counter() - t0
        photos = sorted(SHARED_IMAGES.glob("*/*.jpg"))
        rng = np.random.default_rng(1)
        picks = [photos[i] for i in rng.choice(len(photos), size=queries + 20, replace=True)]
        for p in picks[:20]:
            _post(port, p.read_bytes())
        lat = []
        for p in picks[20:]:
            data = p.read_bytes()
            t = time.perf_counter()
            _post(port, data)
            lat.append(time.perf_counter() - t)
        real = photos[len(photos) // 2]
        answer = _post(port, real.read_bytes(), top=10)
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(True)
        mem = [q.memory_info() for q in tree]
        rss = sum(m.rss for m in mem)
        # Anonymous memory: the RSS less its file-backed pages.  The shards are memory-
        # mapped, and each row read maps the page-cache pages around it (the kernel's
        # fault-around), so the RSS grows with the queries towards the index's size on
        # disk: pages the kernel can drop, not memory the app needs.
        anon = sum(m.rss - m.shared for m in mem)
        lat_ms = np.array(lat) * 1000
        return {
            "start_s": start_s,
            "rss_mib": rss / MIB,
            "anon_mib": anon / MIB,
            "queries": len(lat),
            "p50_ms": float(np.percentile(lat_ms, 50)),
            "p95_ms": float(np.percentile(lat_ms, 95)),
            "photo": f"{real.parent.name}/{real.name}",
            "verdict": answer["verdict"],
            "top3": [
                (m["label"], m["distance"], m["thumbnail"] is not None)
                for m in answer["matches"][:3]
            ],
            "index": answer["model"]["index"],
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- parent


def run_size(n: int, args, real: Path) -> Dict[str, Any]:
    work = Path(args.workdir)
    features = work / f"F{n}"
    t = time.perf_counter()
    generate(real, features, n)
    print(f"[{n}] features: {dir_bytes(features) / MIB:.0f} MiB ({time.perf_counter() - t:.0f} s)")
    script = Path(__file__)
    out: Dict[str, Any] = {"n": n, "features_mib": dir_bytes(features) / MIB}
    for with_index in [True, False] if not args.skip_plain else [True]:
        results = work / f"R{n}{'' if with_index else '-noindex'}"
        res = run_worker(
            script,
            ["--_worker", "reduce", "--features", str(features), "--results", str(results)]
            + ([] if with_index else ["--no-index"]),
            work / "logs" / f"reduce-{n}-{with_index}.log",
        )
        out["with_index" if with_index else "without_index"] = res
        print(f"[{n}] reduce index={with_index}: {res['seconds']:.0f} s, {res['memory']}")
    out["index_mib"] = dir_bytes(work / f"R{n}" / "index") / MIB
    out.update(measure_app(n, args))
    if not args.skip_plain:
        shutil.rmtree(work / f"R{n}-noindex", ignore_errors=True)
    return out


def measure_app(n: int, args) -> Dict[str, Any]:
    """``serve`` (and the load average then) and the search alone on ``R<n>``."""
    work = Path(args.workdir)
    results = work / f"R{n}"
    serve = measure_serve(results, args.queries, work / "logs" / f"serve-{n}.log")
    serve["loadavg_1m"] = os.getloadavg()[0]
    print(f"[{n}] serve: {serve}")
    return {"serve": serve, "search_only": search_only(results, args.queries)}


def _without(r: Dict[str, Any]) -> str:
    """A run without the index, or the same run's time before its index step."""
    if "without_index" in r:
        return f"{r['without_index']['seconds']:.0f}"
    return f"({r['with_index']['timings_s']['reduce_total']:.0f})"


def _search(r: Dict[str, Any]) -> str:
    s = r.get("search_only")
    return "-" if s is None else f"{s['p50_ms']:.2f} / {s['p95_ms']:.2f}"


def _steps(steps: Dict[str, float]) -> str:
    # "graph": the HNSW graph of the rows measured before the IVF index replaced it.
    ann = steps.get("ann", steps.get("graph", 0))
    return " / ".join(f"{v:.0f}" for v in (steps.get("shards", 0), ann, steps.get("statistics", 0)))


def tables(rows: List[Dict[str, Any]]) -> List[str]:
    def mem(r, key):
        return r["with_index"]["memory"][key]

    t1 = table(
        ["rows", "reduce with index (s)", "index step (s)", "index share", "without index (s)",
         "index: shards / IVF (HNSW before) / statistics (s)", "driver Python peak (MiB)",
         "driver JVM peak (MiB)"],
        [
            [
                r["n"],
                r["with_index"]["seconds"],
                r["with_index"]["index"]["build_s"],
                f"{r['with_index']['index']['build_s'] / r['with_index']['seconds']:.0%}",
                _without(r),
                _steps(r["with_index"]["index"].get("build_steps_s") or {}),
                mem(r, "driver_python_peak_mib"),
                mem(r, "jvm_peak_mib"),
            ]
            for r in rows
        ],
        digits=0,
    )  # fmt: skip
    t2 = table(
        ["rows", "index kind", "recall@10", "index on disk (MiB)", "serve RSS / anonymous (MiB)",
         "query p50 / p95 (ms)", "search alone p50 / p95 (ms)", "load avg",
         "answer for a real photo"],
        [
            [
                r["n"],
                r["serve"]["index"],
                r["with_index"]["index"]["recall_at_10"],
                r["index_mib"],
                f"{r['serve']['rss_mib']:,.0f} / "
                + (f"{r['serve']['anon_mib']:,.0f}" if "anon_mib" in r["serve"] else "-"),
                f"{r['serve']['p50_ms']:.0f} / {r['serve']['p95_ms']:.0f}",
                _search(r),
                r["serve"].get("loadavg_1m", "-"),
                f"{r['serve']['photo']}: {r['serve']['verdict']}",
            ]
            for r in rows
        ],
        digits=1,
    )  # fmt: skip
    return [t1, t2]


def slope(rows: List[Dict[str, Any]], key: str) -> Optional[float]:
    """MiB per 100k rows of a driver peak, least squares over the sizes."""
    import numpy as np

    if len(rows) < 2:
        return None
    x = np.array([r["n"] for r in rows], float) / 1e5
    y = np.array([r["with_index"]["memory"][key] for r in rows], float)
    return float(np.polyfit(x, y, 1)[0])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,300000")
    p.add_argument("--quick", action="store_true", help="one size of 20k rows")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--workdir", default="/tmp/fruits-scale-bench")
    p.add_argument("--skip-plain", action="store_true", help="no run without the index")
    p.add_argument("--_worker", choices=["reduce"])
    p.add_argument("--features")
    p.add_argument("--results")
    p.add_argument("--no-index", dest="index", action="store_false")
    p.add_argument(
        "--serve-only",
        action="store_true",
        help="measure serve again on the RESULTS of an earlier run of these sizes",
    )
    args = p.parse_args(argv)
    if args._worker == "reduce":
        worker_reduce(args)
        return 0
    quiet_env()
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    real = real_features(work)
    stem = "scale_bench_quick" if args.quick else "scale_bench"
    prev = Path(ROOT / "benchmarks" / "results" / f"{stem}.json")
    done = (
        {r["n"]: r for r in json.loads(prev.read_text()).get("rows", [])} if prev.exists() else {}
    )
    rows = []
    for n in sizes:
        if args.serve_only:
            rows.append({**done[n], **measure_app(n, args)})  # an earlier run's row
        else:
            rows.append(run_size(n, args, real))
        done[n] = rows[-1]
        merged = [done[k] for k in sorted(done)]
        tbls = tables(merged)
        data = {
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "machine": machine_info(),
            "rows": merged,
            "driver_slope_mib_per_100k": {
                k: slope(merged, k) for k in ("driver_python_peak_mib", "jvm_peak_mib")
            },
        }
        write_results(stem, data, tbls)
    show_tables(tables([done[k] for k in sorted(done)]))
    print(JSON_MARK, json.dumps(data["driver_slope_mib_per_100k"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
