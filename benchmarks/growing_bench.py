"""A growing bucket: incremental featurize, ``reduce --update``, ``watch`` latency, listing cost.

Four parts, each in a subprocess of its own (one Spark session each), each measured
against a baseline run in the same process:

``incremental``  ``featurize --incremental`` on OLD already-featurized images plus NEW
                 ones, divided by a full ``featurize`` of OLD + NEW (same session,
                 warm workers).  Goal: close to NEW / (OLD + NEW).
``update``       ``reduce --update`` (saved moments of ROWS + NEW rows) divided by a
                 full ``reduce`` of ROWS + NEW (synthetic 1280-d features), and the
                 two results' agreement.
``watch``        latency from an image landing in the watched folder to its row being
                 committed (readable), at a ``--trigger`` (default 10 s): p50 / p95.
``listing``      Spark's ``binaryFile`` listing time against the number of files:
                 a local folder (10k, 100k) and a local S3 (moto server, S3A, 10k
                 keys), the whole bucket vs one day's prefix (``Test/YYYY/MM/DD/``).

::

    python benchmarks/growing_bench.py --quick            # minutes: small sizes
    python benchmarks/growing_bench.py --parts incremental --old 5000 --new 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, ROOT, emit, quiet_env, run_worker

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "fruits360"
SAMPLE_IMAGES = ROOT / "sample" / "fruits360"
PARTS = ("incremental", "update", "watch", "listing")
LOG_DIR = Path(tempfile.gettempdir()) / "fruits-bench-growing"  # one log per part


def _session(master: str = "local[2]", conf: Optional[Dict[str, str]] = None):
    from stages.base.session import spark_session

    base = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}
    return spark_session("growing-bench", master=master, conf={**base, **(conf or {})})


def _images(src: Path) -> List[Path]:
    return sorted(p for p in src.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))


def _fill(bucket: Path, images: List[Path], start: int, count: int) -> None:
    """Hard links ``start .. start+count`` of an endless cycle over ``images``."""
    for i in range(start, start + count):
        src = images[i % len(images)]
        dest = bucket / src.parent.name / f"{src.stem}_r{i}{src.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)


def _interleaved(
    repeats: int, state: Path, first: Callable[[int], Any], second: Callable[[int], Any]
) -> Tuple[Tuple[List[float], Any], Tuple[List[float], Any]]:
    """``first(r)`` then ``second(r)`` for each round ``r``, interleaved (the machine's
    noise falls on both alike); ``state``, the folder ``first`` changes, is restored to
    its copy of before the rounds for each round but the first.  Seconds of every run
    and the last result, of each."""
    before = state.with_name(state.name + ".before")
    shutil.copytree(state, before)
    times: Tuple[List[float], List[float]] = ([], [])
    results: List[Any] = [None, None]
    for r in range(repeats):
        if r:
            shutil.rmtree(state)
            shutil.copytree(before, state)
        for i, run in enumerate((first, second)):
            t = time.perf_counter()
            results[i] = run(r)
            times[i].append(time.perf_counter() - t)
    return (times[0], results[0]), (times[1], results[1])


# ------------------------------------------------------------------ incremental


def worker_incremental(args) -> Dict[str, Any]:
    from stages.featurize import featurize
    from stages.featurize.incremental import featurize_incremental

    spark = _session()
    work = Path(args.work)
    images = _images(Path(args.images))
    bucket = work / "Test"
    _fill(bucket, images, 0, args.old)
    t = time.perf_counter()
    setup = featurize_incremental(spark, str(bucket), str(work / "Features"), weights="bundled")
    t_setup = time.perf_counter() - t
    _fill(bucket, images, args.old, args.new)
    (t_inc, inc), (t_full, full) = _interleaved(
        args.repeats,
        work / "Features",
        lambda r: featurize_incremental(
            spark, str(bucket), str(work / "Features"), weights="bundled"
        ),
        lambda r: featurize(spark, str(bucket), str(work / f"Full{r}"), weights="bundled"),
    )
    spark.stop()
    return {
        "old": args.old,
        "new": args.new,
        "setup_s": t_setup,
        "setup_images": setup.images,
        "incremental_s": min(t_inc),
        "incremental_all_s": t_inc,
        "incremental_images": inc.images,
        "incremental_scan": inc.scan,
        "full_s": min(t_full),
        "full_all_s": t_full,
        "full_images": full.images,
        "ratio": min(t_inc) / min(t_full),
        "share_new": args.new / (args.old + args.new),
    }


# ------------------------------------------------------------------ update


def worker_update(args) -> Dict[str, Any]:
    import numpy as np

    from benchmarks.reduce_bench import make_synthetic
    from stages.reduce import reduce_features
    from stages.reduce.pca_model import PCAModel
    from stages.reduce.update import update_reduce

    work = Path(args.work)
    features = work / "Features"
    files_old = max(2, args.rows // 25000)
    files_new = max(1, args.new_rows // 25000)
    make_synthetic(features / "run=a", args.rows, 1280, files_old, seed=0)
    make_synthetic(features / "run=b", args.new_rows, 1280, files_new, seed=1)
    for stamp in features.glob("run=*/_bench.json"):
        stamp.unlink()
    (features / "_SUCCESS").touch()  # the commit marker reduce requires of a features folder
    held = work / "held"  # the new rows wait aside while the model of the old ones is fitted
    if held.exists():
        shutil.rmtree(held)
    (features / "run=b").rename(held)
    spark = _session()
    t = time.perf_counter()
    reduce_features(spark, str(features), str(work / "Results"), k=args.k)
    t_setup = time.perf_counter() - t
    held.rename(features / "run=b")
    (t_update, upd), (t_full, _) = _interleaved(
        args.repeats,
        work / "Results",
        lambda r: update_reduce(spark, str(features), str(work / "Results")),
        lambda r: reduce_features(
            spark, str(features), str(work / "Full"), k=args.k, overwrite=True
        ),
    )
    spark.stop()
    a, b = PCAModel.load(str(work / "Results")), PCAModel.load(str(work / "Full"))
    rel = (
        np.abs(a.pca_fit.eigenvalues - b.pca_fit.eigenvalues)[: args.k]
        / b.pca_fit.eigenvalues[: args.k]
    )
    cos = np.abs(np.sum(a.pca_fit.components * b.pca_fit.components, axis=0))
    return {
        "rows": args.rows,
        "new_rows": args.new_rows,
        "k": args.k,
        "setup_full_reduce_of_old_s": t_setup,
        "update_s": min(t_update),
        "update_all_s": t_update,
        "update_mode": upd["update"]["mode"],
        "update_timings": upd["timings_s"],
        "full_s": min(t_full),
        "full_all_s": t_full,
        "ratio": min(t_update) / min(t_full),
        "eigenvalues_max_rel_err": float(rel.max()),
        "components_min_abs_cos": float(cos.min()),
    }


# ------------------------------------------------------------------ watch


def worker_watch(args) -> Dict[str, Any]:
    import numpy as np

    from stages.storage.table import FeaturesTable
    from stages.watch import WatchParams, watch

    work = Path(args.work)
    bucket = work / "Test"
    images = _images(Path(args.images))
    _fill(bucket, images, 0, 8)  # something to start from
    spark = _session()
    opts = WatchParams(weights="bundled", trigger=f"{args.trigger}s", stop_after=args.duration)
    out: Dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: out.update(watch(spark, str(bucket), str(work / "Features"), opts)),
        daemon=True,
    )
    t_start = time.time()
    thread.start()
    table = FeaturesTable(spark, str(work / "Features"))
    # Wait for the first batch (the model build) so that the landing times measure
    # the steady state, then land images at random moments.
    deadline = time.time() + 300
    while not table.records() and time.time() < deadline:
        time.sleep(0.5)
    rng = np.random.default_rng(0)
    landed: Dict[str, float] = {}
    # The last landings leave the query time for two triggers and a batch.
    t_end = t_start + args.duration - 3 * args.trigger - 15
    i = 8
    while time.time() < t_end:
        src = images[i % len(images)]
        dest = bucket / src.parent.name / f"{src.stem}_w{i}{src.suffix}"
        tmp = dest.with_name("." + dest.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.rename(dest)
        landed[dest.name] = time.time()
        i += 1
        time.sleep(float(rng.uniform(0.2, args.gap * 2)))
    thread.join()
    spark_rows = {}
    from datetime import datetime

    for rec in table.records():
        if rec.get("kind") != "watch":
            continue
        committed = datetime.fromisoformat(rec["committed"]).timestamp()
        for r in spark.read.parquet(table.run_uri(rec["run"])).select("path").collect():
            spark_rows[r[0].rsplit("/", 1)[1]] = committed
    spark.stop()
    lat = np.array([spark_rows[n] - t for n, t in landed.items() if n in spark_rows])
    return {
        "trigger_s": args.trigger,
        "landed": len(landed),
        "committed": int(len(lat)),
        "missing": len(landed) - int(len(lat)),
        "batches": out.get("batches"),
        "latency_p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p95_s": float(np.percentile(lat, 95)) if len(lat) else None,
        "latency_max_s": float(lat.max()) if len(lat) else None,
    }


# ------------------------------------------------------------------ listing


def _tree(root: Path, n: int, days: int) -> None:
    """``n`` 100-byte files as ``Test/2026/MM/DD/Class<c>/<i>.jpg`` over ``days`` days."""
    stamp = root / ".bench"
    if stamp.exists() and stamp.read_text() == f"{n},{days}":
        return
    if root.exists():
        shutil.rmtree(root)
    payload = b"\xff\xd8\xff" + b"\0" * 97
    per_day = n // days
    for i in range(n):
        day = min(i // per_day, days - 1)
        folder = root / "2026" / f"{1 + day // 28:02d}" / f"{1 + day % 28:02d}" / f"Class{i % 10}"
        if i % per_day < 10:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(payload)
    stamp.write_text(f"{n},{days}")


def _list_time(spark, uri: str, repeat: int = 2) -> Dict[str, Any]:
    from stages.featurize.frame import read_images

    best, count = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        count = len(read_images(spark, uri)._jdf.inputFiles())
        best = min(best, time.perf_counter() - t)
    return {"uri": uri, "files": count, "seconds": best}


def worker_listing(args) -> Dict[str, Any]:
    work = Path(args.work)
    days = 100
    spark_conf: Dict[str, str] = {}
    from tests.conftest import s3a_jars

    jars = s3a_jars()
    if jars:
        spark_conf["spark.jars"] = ",".join(jars)
    spark = _session(conf=spark_conf)
    rows: List[Dict[str, Any]] = []
    for n in [int(x) for x in args.local_sizes.split(",") if x]:
        root = work / f"local{n}" / "Test"
        t = time.perf_counter()
        _tree(root, n, days)
        made = time.perf_counter() - t
        whole = _list_time(spark, str(root))
        one_day = _list_time(spark, str(root / "2026" / "01" / "01"))
        rows.append(
            {"store": "local", "n": n, "create_s": made, "whole": whole, "one_day": one_day}
        )
    if args.s3_keys and jars:
        rows.append(_s3_listing(spark, args.s3_keys, days))
    spark.stop()
    return {"rows": rows, "days": days}


def _s3_listing(spark, n: int, days: int) -> Dict[str, Any]:
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto.server import ThreadedMotoServer

    from tests.s3_fixtures import S3A_SETTINGS, _free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="eu-west-3",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(
            Bucket="bench", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"}
        )
        per_day = n // days

        def put(i: int) -> None:
            day = min(i // per_day, days - 1)
            key = f"Test/2026/{1 + day // 28:02d}/{1 + day % 28:02d}/Class{i % 10}/{i}.jpg"
            s3.put_object(Bucket="bench", Key=key, Body=b"\xff\xd8\xff" + b"\0" * 97)

        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(n)))
        made = time.perf_counter() - t
        hconf = spark.sparkContext._jsc.hadoopConfiguration()
        for k, v in dict(S3A_SETTINGS, **{"fs.s3a.endpoint": endpoint}).items():
            hconf.set(k, v)
        whole = _list_time(spark, "s3a://bench/Test/")
        one_day = _list_time(spark, "s3a://bench/Test/2026/01/01/")
        t = time.perf_counter()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="Test/")
        flat = sum(len(p.get("Contents", [])) for p in pages)
        flat_s = time.perf_counter() - t
        return {
            "store": "s3 (moto, S3A)",
            "n": n,
            "create_s": made,
            "whole": whole,
            "one_day": one_day,
            "flat_list_objects_v2": {"files": flat, "seconds": flat_s},
        }
    finally:
        server.stop()


# ------------------------------------------------------------------ parent


def parent(args) -> int:
    quiet_env()
    script = Path(__file__).resolve()
    images = args.images or str(SHARED_IMAGES if SHARED_IMAGES.is_dir() else SAMPLE_IMAGES)
    results: Dict[str, Any] = {"command": " ".join(sys.argv), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="growing-bench-") as tmp:
        for part in args.parts.split(","):
            work = Path(tmp) / part
            work.mkdir()
            common = ["--_worker", part, "--work", str(work), "--images", images]
            common += ["--repeats", str(args.repeats)]
            extra = {
                "incremental": ["--old", str(args.old), "--new", str(args.new)],
                "update": ["--rows", str(args.rows), "--new-rows", str(args.new_rows)],
                "watch": ["--trigger", str(args.trigger), "--duration", str(args.duration)],
                "listing": ["--local-sizes", args.local_sizes, "--s3-keys", str(args.s3_keys)],
            }[part]
            t = time.perf_counter()
            res = run_worker(script, [*common, *extra], LOG_DIR / f"{part}.log")
            res["wall_s"] = time.perf_counter() - t
            results["parts"][part] = res
            print(f"## {part}\n{json.dumps(res, indent=2)}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    out = RESULTS_DIR / f"{args.stem}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes in all)")
    p.add_argument("--images", default=None, help="folder of <Class>/<image>.jpg")
    p.add_argument("--old", type=int, default=5000)
    p.add_argument("--new", type=int, default=500)
    p.add_argument("--rows", type=int, default=200000)
    p.add_argument("--new-rows", type=int, default=20000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="best of, interleaved with the baseline")
    p.add_argument("--trigger", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=150.0)
    p.add_argument("--gap", type=float, default=2.0, help="mean seconds between two landings")
    p.add_argument("--local-sizes", default="10000,100000")
    p.add_argument("--s3-keys", type=int, default=10000)
    p.add_argument("--stem", default="growing")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.old, args.new = min(args.old, 1000), min(args.new, 100)
        args.rows, args.new_rows = min(args.rows, 20000), min(args.new_rows, 2000)
        args.duration = min(args.duration, 90.0)
        args.local_sizes, args.s3_keys = "1000,10000", min(args.s3_keys, 2000)
        if args.stem == "growing":
            args.stem = "growing_quick"
    if args._worker:
        quiet_env()
        fn = {
            "incremental": worker_incremental,
            "update": worker_update,
            "watch": worker_watch,
            "listing": worker_listing,
        }[args._worker]
        emit(fn(args))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
