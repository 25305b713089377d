"""Photos on S3 at the model's speed: throughput, requests per photo, nothing-new cost, queue lag.

A local S3 (moto's server) behind :mod:`benchmarks.s3_latency_proxy`, which adds a fixed
latency to every request (S3's first byte typically takes 10-50 ms) and counts the
requests by kind.  Three parts, each in a subprocess of its own (one Spark session,
``local[2]``), each measured against a baseline in the same process:

``throughput``   ``featurize`` of the same photos from a local folder and from
                 ``s3a://`` at each added latency (0, 20, 50 ms), in one session (local
                 first and last: their mean is the baseline).  img/s from S3 / img/s
                 local, and the S3 requests per photo by kind.  Goal: >= 0.8 at 20 ms,
                 one GET and no HEAD per photo.
``incremental``  ``featurize --incremental`` with nothing new over 1k, 10k and 100k
                 objects (100 per folder) at 20 ms: its requests and wall time, against
                 the first run's (which featurized them).  Goal: flat, no request per
                 object.
``queue``        ``watch --queue``: photos uploaded one at a time into a bucket that
                 notifies an SQS queue; landing (the PUT returned) to row (its run
                 committed), p50 / p95.

::

    python benchmarks/s3_bench.py --quick                      # minutes
    python benchmarks/s3_bench.py --parts throughput --latencies 0,20,50
    python benchmarks/s3_bench.py --parts incremental --sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, ROOT, emit, quiet_env, run_worker
from benchmarks._table import Col, records_table, show_tables

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "fruits360"
SAMPLE_IMAGES = ROOT / "sample" / "fruits360"
PARTS = ("throughput", "incremental", "queue")
LOG_DIR = Path(tempfile.gettempdir()) / "fruits-bench-s3"
BUCKET = "bench"
REGION = "eu-west-3"


# ------------------------------------------------------------------ the local S3


class LocalS3:
    """moto's server, the latency proxy in front of it, a Spark session reading S3A
    through the proxy, and boto3 (in this process) pointed at the proxy too."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        from moto.server import ThreadedMotoServer

        from benchmarks.s3_latency_proxy import LatencyProxy
        from tests.s3_fixtures import _free_port

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.moto = f"http://127.0.0.1:{port}"
        self.proxy = LatencyProxy(self.moto, latency_ms).start()
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": self.proxy.endpoint,
            }
        )
        import boto3

        # Uploads go straight to moto: the set-up is not what is measured.
        self.direct = boto3.client("s3", region_name=REGION, endpoint_url=self.moto)
        self.direct.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )

    def spark(self, master: str = "local[2]"):
        from stages.base.s3a import find_jars
        from stages.base.session import spark_session
        from tests.s3_fixtures import S3A_SETTINGS

        conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}
        conf["spark.jars"] = ",".join(find_jars())
        for k, v in {**S3A_SETTINGS, "fs.s3a.endpoint": self.proxy.endpoint}.items():
            conf[f"spark.hadoop.{k}"] = v
        return spark_session("s3-bench", master=master, conf=conf)

    def upload(self, items: List[tuple], threads: int = 16) -> None:
        """``(key, bytes)`` pairs, many at a time."""

        def put(item) -> None:
            self.direct.put_object(Bucket=BUCKET, Key=item[0], Body=item[1])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, items))

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


def _images(src: Path, n: int) -> List[Path]:
    paths = sorted(p for p in src.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    return paths[:n]


def _per_photo(counts: Dict[str, int], n: int) -> Dict[str, float]:
    return {k: v / max(1, n) for k, v in counts.items()}


# ------------------------------------------------------------------ throughput


def worker_throughput(args) -> Dict[str, Any]:
    from stages.featurize import featurize

    s3 = LocalS3()
    images = _images(Path(args.images), args.n)
    s3.upload([(f"Test/{p.parent.name}/{p.name}", p.read_bytes()) for p in images])
    warm = _images(SAMPLE_IMAGES, 100)
    s3.upload([(f"Warm/{p.parent.name}/{p.name}", p.read_bytes()) for p in warm])
    local = Path(args.work) / "local"
    if local.exists():
        shutil.rmtree(local)
    for p in images:
        (local / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, local / p.parent.name / p.name)
    spark = s3.spark()
    out = Path(args.work) / "out"
    shutil.rmtree(out, ignore_errors=True)
    opts = {"weights": "bundled"}
    # Warm-up: Python workers started, the model built and cached in each, boto3 loaded
    # in each worker and the S3 listing's code path compiled.
    featurize(spark, str(SAMPLE_IMAGES), str(out / "warm"), **opts)
    featurize(spark, f"s3a://{BUCKET}/Warm/", str(out / "warm_s3"), **opts)
    latencies = [float(ms) for ms in args.latencies.split(",")]
    # Local first and last (their mean is the baseline); the middle latency twice.
    plan = [("local", None)] + [("s3a", ms) for ms in latencies]
    plan += [("s3a", latencies[len(latencies) // 2]), ("local", None)]
    import psutil

    me = psutil.Process()
    rows = []
    for i, (store, ms) in enumerate(plan):
        s3.proxy.set_latency(ms or 0.0)
        s3.proxy.reset()
        src = str(local) if store == "local" else f"s3a://{BUCKET}/Test/"
        cpu = sum(me.cpu_times()[:2])
        t = time.perf_counter()
        report = featurize(spark, src, str(out / f"run{i}"), **opts)
        seconds = time.perf_counter() - t
        # This process: the driver, and moto and the proxy (what S3 itself would do).
        cpu = sum(me.cpu_times()[:2]) - cpu
        counts = s3.proxy.reset()
        n = report.images
        rows.append(
            {
                "store": store,
                "latency_ms": ms,
                "images": n,
                "errors": report.errors,
                "seconds": seconds,
                "img_s": n / seconds,
                "requests": counts,
                "per_photo": _per_photo(counts, n),
                "summary_requests": getattr(report, "requests", None),
                "driver_and_s3_cpu_s": cpu,
            }
        )
        print(f"{store} {ms} ms: {n / seconds:.1f} img/s {counts}", file=sys.stderr, flush=True)
    base = statistics.mean(r["img_s"] for r in rows if r["store"] == "local")
    for r in rows:
        r["vs_local"] = r["img_s"] / base
    spark.stop()
    s3.stop()
    return {"rows": rows, "baseline_img_s": base, "n": len(images)}


# ------------------------------------------------------------------ incremental


def worker_incremental(args) -> Dict[str, Any]:
    from stages.featurize.incremental import featurize_incremental

    s3 = LocalS3()
    spark = s3.spark()
    rows = []
    for n in [int(x) for x in args.sizes.split(",") if x]:
        prefix = f"Inc{n}/Test/"
        # Not photos: each becomes an error row at once (no model work), which is all a
        # nothing-new run needs from the table: one row per object.
        s3.upload([(f"{prefix}F{i // 100:05d}/{i}.jpg", b"not a jpeg") for i in range(n)])
        features = str(Path(args.work) / f"inc{n}")
        shutil.rmtree(features, ignore_errors=True)
        s3.proxy.set_latency(0)
        s3.proxy.reset()
        t = time.perf_counter()
        first = featurize_incremental(spark, f"s3a://{BUCKET}/{prefix}", features)
        first_s = time.perf_counter() - t
        first_counts = s3.proxy.reset()
        s3.proxy.set_latency(args.latency)
        t = time.perf_counter()
        again = featurize_incremental(spark, f"s3a://{BUCKET}/{prefix}", features)
        seconds = time.perf_counter() - t
        counts = s3.proxy.reset()
        assert again.new == 0 and again.images == 0, again
        rows.append(
            {
                "objects": n,
                "first_rows": first.images,
                "first_seconds_0ms": first_s,
                "first_requests": first_counts,
                "latency_ms": args.latency,
                "seconds": seconds,
                "requests": counts,
                "requests_total": sum(counts.values()),
                "per_object": sum(counts.values()) / n,
            }
        )
        print(f"incremental {n}: {seconds:.1f} s {counts}", file=sys.stderr, flush=True)
    spark.stop()
    s3.stop()
    return {"rows": rows}


# ------------------------------------------------------------------ queue


def worker_queue(args) -> Dict[str, Any]:
    import boto3

    from cluster.notifications import setup_notifications
    from stages.storage.table import FeaturesTable
    from stages.watch import watch

    s3 = LocalS3(args.latency)
    spark = s3.spark()
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=s3.moto)
    conf = setup_notifications(s3.direct, lambda r: sqs, BUCKET, "Test/")
    images = _images(Path(args.images), args.queue_photos)
    features = str(Path(args.work) / "queue_features")
    shutil.rmtree(features, ignore_errors=True)
    landed: Dict[str, float] = {}
    stop = threading.Event()

    def uploader() -> None:
        time.sleep(args.queue_start)  # the query is up and waiting
        for p in images:
            key = f"Test/{p.parent.name}/{p.name}"
            s3.direct.put_object(Bucket=BUCKET, Key=key, Body=p.read_bytes())
            landed[f"s3a://{BUCKET}/{key}"] = time.time()
            if stop.wait(args.queue_every):
                return

    thread = threading.Thread(target=uploader, daemon=True)
    thread.start()
    duration = args.queue_start + len(images) * args.queue_every + args.queue_tail
    result = watch(
        spark,
        f"s3a://{BUCKET}/Test/",
        features,
        weights="bundled",
        queue=conf["queue_url"],
        stop_after=duration,
        trigger=f"{args.trigger:g}s",
    )
    stop.set()
    thread.join()
    table = FeaturesTable(spark, features)
    committed = {r["run"]: r["committed"] for r in table.records()}
    from datetime import datetime

    rows = table.read_runs(table.live_runs()).select("path", "run").collect()
    lags = []
    for path, run in rows:
        if path in landed:
            done = datetime.fromisoformat(committed[run]).timestamp()
            lags.append(done - landed[path])
    lags.sort()
    spark.stop()
    s3.stop()

    def q(p: float) -> Optional[float]:
        return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else None

    return {
        "photos": len(images),
        "rows": len(lags),
        "every_s": args.queue_every,
        "latency_ms": args.latency,
        "p50_s": q(0.5),
        "p95_s": q(0.95),
        "max_s": lags[-1] if lags else None,
        "watch": {k: v for k, v in result.items() if k != "runs"},
    }


# ------------------------------------------------------------------ parent


def parent(args) -> int:
    results: Dict[str, Any] = {}
    script = Path(__file__).resolve()
    for part in args.parts.split(","):
        argv = ["--_worker", part, *args.passthrough]
        print(f"s3_bench: {part} ...", flush=True)
        results[part] = run_worker(script, argv, LOG_DIR / f"{part}.log")
    tables = []
    if "throughput" in results:
        rows = results["throughput"]["rows"]
        for r in rows:
            r["get"] = r["per_photo"].get("GET")
            r["head"] = r["per_photo"].get("HEAD")
            r["list"] = r["requests"].get("LIST")
        tables.append(
            records_table(
                [
                    Col("store", "store"),
                    Col("added latency (ms)", "latency_ms"),
                    Col("images", "images"),
                    Col("wall (s)", "seconds"),
                    Col("img/s", "img_s"),
                    Col("÷ local", "vs_local"),
                    Col("GET/photo", "get"),
                    Col("HEAD/photo", "head"),
                    Col("LISTs", "list"),
                    Col("driver+S3 server CPU (s)", "driver_and_s3_cpu_s"),
                ],
                rows,
            )  # fmt: skip
        )
    if "incremental" in results:
        rows = results["incremental"]["rows"]
        for r in rows:
            r["kinds"] = " ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))
        tables.append(
            records_table(
                [
                    Col("objects", "objects"),
                    Col("added latency (ms)", "latency_ms"),
                    Col("wall (s)", "seconds"),
                    Col("requests", "requests_total"),
                    Col("by kind", "kinds"),
                    Col("per object", "per_object"),
                ],
                rows,
                digits=3,
            )  # fmt: skip
        )
    if "queue" in results:
        r = results["queue"]
        tables.append(
            records_table(
                [
                    Col("photos", "photos"),
                    Col("one every (s)", "every_s"),
                    Col("rows", "rows"),
                    Col("added latency (ms)", "latency_ms"),
                    Col("p50 (s)", "p50_s"),
                    Col("p95 (s)", "p95_s"),
                    Col("max (s)", "max_s"),
                ],
                [r],
            )  # fmt: skip
        )
    show_tables(tables)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{args.stem}.json"
    path.write_text(json.dumps({"args": vars(args), **results}, indent=2, default=str))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    p.add_argument("--stem", default="s3", help="results/<stem>.json")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("passed to the parts")
    g.add_argument(
        "--images", default=str(SHARED_IMAGES if SHARED_IMAGES.is_dir() else SAMPLE_IMAGES)
    )
    g.add_argument("--n", type=int, default=1000, help="photos for throughput")
    g.add_argument("--latencies", default="0,20,50")
    g.add_argument("--sizes", default="1000,10000,100000")
    g.add_argument("--latency", type=float, default=20.0, help="for incremental and queue")
    g.add_argument("--queue-photos", type=int, default=60)
    g.add_argument("--queue-every", type=float, default=0.5)
    g.add_argument("--queue-start", type=float, default=20.0)
    g.add_argument("--queue-tail", type=float, default=30.0)
    g.add_argument("--trigger", type=float, default=1.0, help="watch's poll interval")
    g.add_argument("--work", default=str(LOG_DIR / "work"))
    return p


_PASSED = ("images", "n", "latencies", "sizes", "latency", "queue_photos", "queue_every",
           "queue_start", "queue_tail", "trigger", "work")  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n, args.sizes = min(args.n, 200), "1000,10000"
        args.queue_photos = min(args.queue_photos, 20)
        if args.stem == "s3":
            args.stem = "s3_quick"
    if args._worker:
        quiet_env()
        Path(args.work).mkdir(parents=True, exist_ok=True)
        fn = {"throughput": worker_throughput, "incremental": worker_incremental,
              "queue": worker_queue}[args._worker]  # fmt: skip
        emit(fn(args))
        return 0
    args.passthrough = []
    for name in _PASSED:
        args.passthrough += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
