"""Stage 1 throughput: the Spark featurize job against a single process doing the same work.

The baseline decodes the same JPEGs from disk with :func:`stages.images.decode_image`,
preprocesses them and runs :func:`stages.model.local_featurizer` in batches of 64, on
the same cores.  Every figure is a ratio to a baseline measured in the same run:

* **cold**: the first job of a fresh SparkSession (workers start, TensorFlow import,
  model build, graph tracing) against a fresh process's first pass (TensorFlow
  import, weights, model build, first pass); the JVM start is reported apart.
* **warm**: a second job in the same session (new output) against a warm pass of
  the baseline run in the *same* driver process, interleaved with the Spark runs.
* **steady**: ``(N - 64) / (t_N - t_64)`` from a full run and a 64-image run, so the
  per-job one-off costs drop out.

Each configuration runs in its own subprocess (``--_worker``): one SparkSession per
master, and memory that is its own.  Python worker RSS is sampled in a thread.

Usage::

    python benchmarks/featurize_bench.py --quick      # alpha 0.35, local[2], ~2 min
    python benchmarks/featurize_bench.py              # both alphas, best of 3, sweep
    python benchmarks/featurize_bench.py --profile    # + cProfile inside the workers
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import pstats
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

# Run as a script: this repository first (site-packages holds an unrelated ``benchmarks``),
# and before it a patched copy of ``stages/`` when one is given (``--code``).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("FRUITS_BENCH_CODE"):
    sys.path.insert(0, os.environ["FRUITS_BENCH_CODE"])

from benchmarks._common import (
    RESULTS_DIR,
    ROOT,
    RssSampler,
    code_version,
    emit,
    machine_info,
    max_rss_mib,
    pyplot,
    quiet_env,
    run_worker,
    table,
    wait_quiet,
    write_results,
)

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "fruits360"
SAMPLE_IMAGES = ROOT / "sample" / "fruits360"
BATCH = 64
SMALL = 64
# Where the in-worker profiles go (read by the profiling wrapper inside the executors).
PROFILE_DIR = "/tmp/fruits-bench-featurize/profiles"


def weights_for(alpha: float) -> str:
    """``bundled`` (real ImageNet) at alpha 0.35; seeded random weights otherwise."""
    return "bundled" if abs(alpha - 0.35) < 1e-9 else "random:0"


def list_images(folder: str) -> List[str]:
    """The JPEGs under ``folder`` (``<Class>/<file>.jpg``), sorted."""
    files = glob.glob(os.path.join(folder, "**", "*.jp*g"), recursive=True)
    files += glob.glob(os.path.join(folder, "**", "*.JP*G"), recursive=True)
    return sorted(set(files))


def make_subset(src: str, dst: Path, n: int) -> Path:
    """Copy ``n`` images spread over ``src`` into ``dst`` (the short run's input)."""
    files = list_images(src)
    step = max(1, len(files) // n)
    if dst.exists():
        shutil.rmtree(dst)
    for f in files[::step][:n]:
        target = dst / Path(f).parent.name / Path(f).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return dst


def cores_of(master: str) -> int:
    """Executor cores of a local master (``local[N]`` or ``local[*]``)."""
    m = re.match(r"local\[(\d+|\*)", master)
    if not m or m.group(1) == "*":
        return os.cpu_count() or 1
    return int(m.group(1))


def init_tf_threads(threads: int) -> float:
    """Import TensorFlow with ``threads`` intra-op threads (0: all cores); seconds taken."""
    t0 = time.perf_counter()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    _ = (tf.constant(1.0) + 1.0).numpy()  # starts the runtime: later settings are refused
    return time.perf_counter() - t0


def baseline_pass(files: Sequence[str], featurize: Callable) -> Dict[str, float]:
    """One single-process pass: read, decode, preprocess, infer in batches of 64."""
    import numpy as np
    import psutil

    from stages.images import decode_image, preprocess

    t_read = t_decode = t_infer = 0.0
    sys0 = psutil.cpu_times()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(files), BATCH):
        a = time.perf_counter()
        blobs = []
        for p in files[i : i + BATCH]:
            with open(p, "rb") as fh:
                blobs.append(fh.read())
        b = time.perf_counter()
        x = preprocess(np.stack([decode_image(blob) for blob in blobs]))
        c = time.perf_counter()
        featurize(x)
        d = time.perf_counter()
        t_read += b - a
        t_decode += c - b
        t_infer += d - c
    total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    sys1 = psutil.cpu_times()
    busy = (sum(sys1) - sum(sys0)) - (sys1.idle - sys0.idle) - (sys1.iowait - sys0.iowait)
    return {
        "seconds": total,
        "cpu_s": cpu,
        "others_share": max(0.0, busy - cpu) / (total * (os.cpu_count() or 1)),
        "images": len(files),
        "img_s": len(files) / total,
        "read_s": t_read,
        "decode_preprocess_s": t_decode,
        "infer_s": t_infer,
    }


# ---------------------------------------------------------------- workers (subprocesses)


def worker_baseline(args) -> Dict[str, Any]:
    """A fresh process: cold pass (TF import + weights + build + pass 1), then warm passes."""
    t_tf = init_tf_threads(args.threads)
    from stages.model import local_featurizer, resolve_weights

    t0 = time.perf_counter()
    spec, weights = resolve_weights(weights_for(args.alpha), args.alpha)
    featurize = local_featurizer(weights, spec.alpha)
    t_build = time.perf_counter() - t0
    files = list_images(args.images)
    cold = baseline_pass(files, featurize)
    warm = [_baseline(files, featurize, args) for _ in range(args.repeats)]
    return {
        "kind": "baseline",
        "alpha": spec.alpha,
        "threads": args.threads,
        "tf_import_s": t_tf,
        "weights_and_build_s": t_build,
        "cold_pass": cold,
        "cold_total_s": t_tf + t_build + cold["seconds"],
        "cold_img_s": len(files) / (t_tf + t_build + cold["seconds"]),
        "warm_passes": warm,
        "max_rss_mib": max_rss_mib(),
    }


def _quiet(args) -> Dict[str, float]:
    return wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else {}


def _baseline(files: Sequence[str], featurize: Callable, args) -> Dict[str, Any]:
    quiet = _quiet(args)
    return {**baseline_pass(files, featurize), "quiet": quiet}


def _spark_run(
    spark, images: str, out: str, args, partitions: Optional[int] = None
) -> Dict[str, Any]:
    from stages.featurize import featurize

    quiet = _quiet(args)
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        report = featurize(
            spark,
            images,
            out,
            weights=weights_for(args.alpha),
            alpha=args.alpha,
            batch_size=BATCH,
            partitions=partitions,
            overwrite=True,
        )
        wall = time.perf_counter() - t0
    d = report.to_dict()
    machine = sampler.machine_busy_seconds()
    return {
        "quiet": quiet,
        "others_share": machine["others_cpu_s"] / machine["capacity_cpu_s"],
        "seconds": report.seconds,
        "wall_s": wall,
        "images": report.images,
        "errors": report.errors,
        "img_s": report.images_per_second,
        "tasks": report.partitions,
        "model_builds": report.model_builds,
        "workers": len(d["worker_pids"]),
        "memory": sampler.result(),
        "cpu_s": sampler.cpu_seconds(),
        "machine_cpu_s": machine,
    }


def worker_spark(args) -> Dict[str, Any]:
    """One SparkSession on ``args.master``: cold job, then warm jobs interleaved with
    single-process passes in this driver, then the partition sweep."""
    cores = cores_of(args.master)
    t_tf = init_tf_threads(cores)
    from stages.model import local_featurizer, resolve_weights
    from stages.session import spark_session

    work = Path(args.workdir) / f"spark-{os.getpid()}"
    t0 = time.perf_counter()
    spark = spark_session(
        "featurize-bench",
        master=args.master,
        conf={"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"},
    )
    spark.range(1).count()
    t_session = time.perf_counter() - t0
    if args.profile:
        _install_profiler(args)
    result: Dict[str, Any] = {
        "kind": "spark",
        "code": code_version(),
        "master": args.master,
        "cores": cores,
        "alpha": args.alpha,
        "driver_tf_import_s": t_tf,
        "session_start_s": t_session,
    }
    result["cold"] = _spark_run(spark, args.images, str(work / "cold"), args)
    files = list_images(args.images)
    t0 = time.perf_counter()
    spec, weights = resolve_weights(weights_for(args.alpha), args.alpha)
    local = local_featurizer(weights, spec.alpha)
    baseline_pass(files[:BATCH], local)  # traces the graph: not part of the timed passes
    result["baseline_build_s"] = time.perf_counter() - t0
    result["baseline"], result["warm"], result["small"] = [], [], []
    for r in range(args.repeats):
        result["baseline"].append(_baseline(files, local, args))
        result["warm"].append(_spark_run(spark, args.images, str(work / f"warm{r}"), args))
        if args.small:
            result["small"].append(_spark_run(spark, args.small, str(work / f"small{r}"), args))
    result["sweep"] = []
    for p in args.partitions or []:
        runs = [
            _spark_run(spark, args.images, str(work / f"p{p}-{r}"), args, partitions=p)
            for r in range(args.sweep_repeats)
        ]
        best = min(runs, key=lambda x: x["seconds"])
        best["partitions_requested"] = p
        best["repeats"] = [x["seconds"] for x in runs]
        result["sweep"].append(best)
    if args.partitions:
        result["baseline"].append(_baseline(files, local, args))  # drift check after the sweep
    if args.profile:
        result["profile"] = _profile_job(spark, work, args)
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)
    return result


# ---------------------------------------------------------------- profiling inside workers


def _profiled_featurize_partition(rows, *a, **kw):
    """Executor side: :func:`stages.featurize.featurize_partition` under cProfile.

    The profiler stays on while the generator is suspended, so the serialiser's work
    on the yielded rows (pickling to the JVM) and the reads of the next rows are in
    the profile too (as top-level calls).
    """
    import cProfile
    import os as os_
    import time as time_

    import stages.featurize as sf

    prof = cProfile.Profile()
    t0 = time_.perf_counter()
    n = 0
    prof.enable()
    try:
        for row in sf.featurize_partition(rows, *a, **kw):
            n += 1
            yield row
    finally:
        prof.disable()
        wall = time_.perf_counter() - t0
        os_.makedirs(PROFILE_DIR, exist_ok=True)
        prof.dump_stats(f"{PROFILE_DIR}/task-{os_.getpid()}-{t0:.6f}-{n}-{wall:.3f}.prof")


def _install_profiler(args) -> None:
    """Make the driver ship the profiling wrapper instead of the plain partition function.

    ``featurize``'s closure looks ``featurize_partition`` up in its module's globals
    when cloudpickle serialises it, so patching the attribute here (driver only)
    profiles the real job without changing the stage's code.
    """
    import stages.featurize as sf

    shutil.rmtree(PROFILE_DIR, ignore_errors=True)
    sf.featurize_partition = _profiled_featurize_partition


def _profile_job(spark, work: Path, args) -> Dict[str, Any]:
    """A warm job under the profilers: per-task cProfile and driver-side phase timers."""
    import stages.featurize as sf

    phases: Dict[str, float] = {}

    def timed(name: str, fn: Callable) -> Callable:
        def inner(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        return inner

    saved = sf.resolve_weights, sf.check_output, sf._paths_are_url_encoded
    sf.resolve_weights = timed("driver: resolve_weights (build + load h5)", sf.resolve_weights)
    sf.check_output = timed("driver: check_output", sf.check_output)
    sf._paths_are_url_encoded = timed("driver: url-encoding check", sf._paths_are_url_encoded)
    shutil.rmtree(PROFILE_DIR, ignore_errors=True)
    start_ms = time.time() * 1000
    try:
        run = _spark_run(spark, args.images, str(work / "profiled"), args)
    finally:
        sf.resolve_weights, sf.check_output, sf._paths_are_url_encoded = saved
    jobs = spark_jobs(spark, start_ms)
    files = sorted(glob.glob(f"{PROFILE_DIR}/task-*.prof"))
    tasks = []
    for f in files:
        _, pid, _t0, n, wall = Path(f).stem.split("-")
        tasks.append({"pid": int(pid), "rows": int(n), "wall_s": float(wall)})
    busy = _union_s([(j["start_s"], j["start_s"] + j["seconds"]) for j in jobs])
    phases["driver: outside Spark jobs (Python, py4j, scheduling)"] = run["wall_s"] - busy
    return {
        "run": run,
        "jobs": jobs,
        "driver_phases_s": phases,
        "tasks": tasks,
        "top": _summarise_profiles(files) if files else [],
    }


def spark_jobs(spark, since_ms: float) -> List[Dict[str, Any]]:
    """The Spark jobs submitted since ``since_ms`` (epoch ms): name, tasks, start, seconds.

    Read from the JVM's status store (works with the UI off).
    """
    store = spark.sparkContext._jsc.sc().statusStore()
    it = store.jobsList(None).iterator()
    jobs = []
    while it.hasNext():
        j = it.next()
        sub, done = j.submissionTime(), j.completionTime()
        if not sub.isDefined() or sub.get().getTime() < since_ms:
            continue
        start = sub.get().getTime()
        end = done.get().getTime() if done.isDefined() else start
        jobs.append(
            {
                "job": int(j.jobId()),
                "name": str(j.name()),
                "tasks": int(j.numTasks()),
                "start_s": (start - since_ms) / 1000,
                "seconds": (end - start) / 1000,
            }
        )
    return sorted(jobs, key=lambda j: j["job"])


def _union_s(intervals: Sequence[Any]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# Buckets for the executor-side profile: (label, regex on "file:line(function)").
_BUCKETS = [
    ("model build (get_featurizer)", r"_build_featurizer|get_featurizer"),
    ("inference (TF graph)", r"TFE_Py_Execute|quick_execute|_call_flat|__call__.*polymorphic"),
    ("JPEG decode + resize (Pillow)", r"decode_image"),
    ("preprocess (uint8 -> float32)", r"\(preprocess\)"),
    ("features to Python lists (tolist)", r"method 'tolist'"),
    ("rows JVM -> Python (read, unpickle)", r"load_stream|_read_with_length|read_int|loads"),
    ("rows Python -> JVM (pickle, write)", r"dump_stream|dumps|_write_with_length|write_int"),
    ("broadcast value (weights)", r"broadcast\.py.*value|_load"),
]


def _summarise_profiles(files: Sequence[str]) -> List[Dict[str, Any]]:
    """Cumulative times of the buckets above, summed over tasks, plus the top functions."""
    stats = pstats.Stats(files[0])
    for f in files[1:]:
        stats.add(f)
    raw = stats.stats  # type: ignore[attr-defined]
    out: List[Dict[str, Any]] = []
    for label, pattern in _BUCKETS:
        rx = re.compile(pattern)
        best = 0.0
        for (fname, line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
            if rx.search(f"{fname}:{line}({func})") and ct > best:
                best = ct  # the outermost matching frame (cumulative)
        out.append({"what": label, "cumulative_s": best})
    tops = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in tops:
        out.append(
            {
                "what": f"self: {Path(fname).name}:{line}({func})",
                "calls": nc,
                "self_s": tt,
                "cumulative_s": ct,
            }
        )
    return out


# ---------------------------------------------------------------- the parent


def _best(runs: Sequence[Dict[str, Any]], key: str = "seconds") -> Dict[str, Any]:
    return min(runs, key=lambda r: r[key])


def summarise(alpha_runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per alpha: cold, warm and steady throughput and their ratios."""
    rows = []
    for pair in alpha_runs:
        base, sp = pair["baseline"], pair["spark"]
        b_warm = max(p["img_s"] for p in sp["baseline"])
        b_warm_fresh = max(p["img_s"] for p in base["warm_passes"])
        warm = _best(sp["warm"])
        small = _best(sp["small"]) if sp["small"] else None
        n_full, n_small = warm["images"], small["images"] if small else 0
        steady = (
            (n_full - n_small) / (warm["seconds"] - small["seconds"])
            if small and warm["seconds"] > small["seconds"]
            else float("nan")
        )
        cold_job = sp["driver_tf_import_s"] + sp["cold"]["seconds"]
        cold_img_s = sp["cold"]["images"] / cold_job
        rows.append(
            {
                "alpha": sp["alpha"],
                "weights": weights_for(sp["alpha"]),
                "images": n_full,
                "tasks": warm["tasks"],
                "baseline_cold_img_s": base["cold_img_s"],
                "spark_cold_img_s": cold_img_s,
                "cold_ratio": cold_img_s / base["cold_img_s"],
                "baseline_warm_img_s": b_warm,
                "baseline_warm_img_s_fresh_process": b_warm_fresh,
                "spark_warm_img_s": warm["img_s"],
                "warm_ratio": warm["img_s"] / b_warm,
                "spark_steady_img_s": steady,
                "steady_ratio": steady / b_warm,
                "session_start_s": sp["session_start_s"],
                "driver_tf_import_s": sp["driver_tf_import_s"],
                "cold_job_s": cold_job,
                "warm_job_s": warm["seconds"],
                "small_job_s": small["seconds"] if small else None,
                "one_off_cold_s": cold_job - n_full / steady if steady == steady else None,
                "one_off_warm_s": warm["seconds"] - n_full / steady if steady == steady else None,
                "model_builds_warm": warm["model_builds"],
                "baseline_tf_import_s": base["tf_import_s"],
                "baseline_build_s": base["weights_and_build_s"],
                "baseline_decode_share": _best(sp["baseline"])["decode_preprocess_s"]
                / _best(sp["baseline"])["seconds"],
                "worker_peak_mib": max(
                    r["memory"]["worker_peak_mib"] for r in [sp["cold"], *sp["warm"]]
                ),
                "workers_sum_peak_mib": max(
                    r["memory"]["workers_sum_peak_mib"] for r in [sp["cold"], *sp["warm"]]
                ),
                "baseline_process_peak_mib": base["max_rss_mib"],
                "warm_repeats_s": [r["seconds"] for r in sp["warm"]],
                "baseline_repeats_s": [r["seconds"] for r in sp["baseline"]],
                "warm_cpu_s": warm["cpu_s"],
                "others_share_baseline": _best(sp["baseline"])["others_share"],
                "others_share_warm": warm["others_share"],
                "cpu_s_per_1000_baseline": 1000 * _best(sp["baseline"])["cpu_s"] / n_full,
                "cpu_s_per_1000_warm": 1000 * sum(warm["cpu_s"].values()) / n_full,
                # Steady state per executor core (what a cluster of many cores approaches).
                "img_per_core_s": (steady if steady == steady else warm["img_s"]) / sp["cores"],
            }
        )
    return rows


def print_tables(rows: List[Dict[str, Any]], sweep: List[Dict[str, Any]], profiles) -> List[str]:
    """Print and return the tables."""
    out = []
    out.append(
        table(
            [
                "alpha",
                "weights",
                "tasks",
                "baseline cold img/s",
                "spark cold img/s",
                "cold ratio",
                "baseline warm img/s",
                "spark warm img/s",
                "warm ratio",
                "spark steady img/s",
                "steady ratio",
            ],
            [
                [
                    r["alpha"],
                    r["weights"],
                    r["tasks"],
                    r["baseline_cold_img_s"],
                    r["spark_cold_img_s"],
                    r["cold_ratio"],
                    r["baseline_warm_img_s"],
                    r["spark_warm_img_s"],
                    r["warm_ratio"],
                    r["spark_steady_img_s"],
                    r["steady_ratio"],
                ]
                for r in rows
            ],
        )
    )
    out.append(
        table(
            [
                "alpha",
                "session start s",
                "driver TF import s",
                "cold job s",
                "warm job s",
                f"{SMALL}-img warm job s",
                "one-off cold s",
                "one-off warm s",
                "model builds / warm job",
                "baseline decode share",
                "worker peak RSS MiB",
                "workers sum MiB",
                "baseline process MiB",
                "CPU s / 1000 img (base / spark)",
                "others' CPU (base / spark)",
            ],
            [
                [
                    r["alpha"],
                    r["session_start_s"],
                    r["driver_tf_import_s"],
                    r["cold_job_s"],
                    r["warm_job_s"],
                    r["small_job_s"],
                    r["one_off_cold_s"],
                    r["one_off_warm_s"],
                    r["model_builds_warm"],
                    r["baseline_decode_share"],
                    r["worker_peak_mib"],
                    r["workers_sum_peak_mib"],
                    r["baseline_process_peak_mib"],
                    f"{r['cpu_s_per_1000_baseline']:.1f} / {r['cpu_s_per_1000_warm']:.1f}",
                    f"{r['others_share_baseline']:.0%} / {r['others_share_warm']:.0%}",
                ]
                for r in rows
            ],
        )
    )
    if sweep:
        out.append(
            table(
                [
                    "master",
                    "alpha",
                    "partitions",
                    "tasks",
                    "img/s",
                    "ratio",
                    "baseline img/s",
                    "worker peak MiB",
                    "workers",
                    "model builds",
                    "others' CPU",
                ],
                [
                    [
                        s["master"],
                        s["alpha"],
                        s["partitions_requested"],
                        s["tasks"],
                        s["img_s"],
                        s["ratio"],
                        s["baseline_img_s"],
                        s["memory"]["worker_peak_mib"],
                        s["memory"]["workers_seen"],
                        s["model_builds"],
                        f"{s['others_share']:.0%}",
                    ]
                    for s in sweep
                ],
            )
        )
    for prof in profiles:
        run = prof["run"]
        lines = [
            [f"job wall ({run['tasks']} tasks, {run['images']} images)", run["seconds"]],
            *[
                [f"Spark job {j['job']}: {j['name']} ({j['tasks']} tasks)", j["seconds"]]
                for j in prof.get("jobs", [])
            ],
            *[[k, v] for k, v in prof["driver_phases_s"].items()],
            *[[f"task pid {t['pid']} ({t['rows']} rows)", t["wall_s"]] for t in prof["tasks"]],
            *[[f"CPU s: {k}", v] for k, v in run["cpu_s"].items()],
        ]
        lines += [
            [t["what"], t["cumulative_s"]] for t in prof["top"] if not t["what"].startswith("self:")
        ]
        lines += [
            [f"{t['what']} x{t['calls']}", t["self_s"]]
            for t in prof["top"]
            if t["what"].startswith("self:")
        ][:10]
        out.append(f"profile alpha={prof['alpha']}\n" + table(["where", "seconds"], lines))
    for t in out:
        print(t + "\n")
    return out


def plot(rows: List[Dict[str, Any]], sweep: List[Dict[str, Any]], path: Path) -> None:
    """Ratios per alpha, and img/s against partitions per master."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    kinds = ["cold_ratio", "warm_ratio", "steady_ratio"]
    width = 0.25
    for i, kind in enumerate(kinds):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [r[kind] for r in rows],
            width,
            label=kind.replace("_", " "),
        )
    ax.axhline(0.9, color="k", ls="--", lw=1, label="goal 0.9")
    ax.set_xticks([j + width for j in range(len(rows))])
    ax.set_xticklabels([f"alpha {r['alpha']}" for r in rows])
    ax.set_ylabel("Spark img/s / single-process img/s")
    ax.set_title("featurize vs single process (local[2])")
    ax.legend(fontsize=8)
    if sweep:
        ax = axes[0][1]
        for master in sorted({s["master"] for s in sweep}):
            pts = [s for s in sweep if s["master"] == master]
            ax.plot(
                [s["partitions_requested"] for s in pts],
                [s["ratio"] for s in pts],
                "o-",
                label=master,
            )
        ax.set_xscale("log", base=2)
        ax.axhline(0.9, color="k", ls="--", lw=1)
        ax.set_xlabel("partitions")
        ax.set_ylabel("ratio to single process (same cores)")
        ax.set_title(f"partition sweep, alpha {sweep[0]['alpha']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parent(args) -> int:
    """Run the configurations in subprocesses, then print, save and plot."""
    script = Path(__file__).resolve()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_images = len(list_images(args.images))
    small = make_subset(args.images, work / "small", SMALL)
    info = machine_info()
    print(f"featurize bench: {n_images} images under {args.images}; load {info['loadavg_1_5_15']}")
    common = [
        "--images",
        args.images,
        "--workdir",
        str(work),
        "--quiet-wait",
        str(args.quiet_wait),
        "--repeats",
        str(args.repeats),
    ]
    pairs = []
    profiles = []
    for alpha in args.alphas:
        print(f"  alpha {alpha}: single process (fresh) ...", flush=True)
        base = run_worker(
            script,
            ["--_worker", "baseline", "--alpha", str(alpha), "--threads", "0", *common],
            work / f"log-baseline-{alpha}.txt",
        )
        print(f"  alpha {alpha}: Spark local[2], cold + {args.repeats} warm ...", flush=True)
        extra = ["--profile"] if args.profile else []
        sp = run_worker(
            script,
            [
                "--_worker",
                "spark",
                "--master",
                "local[2]",
                "--alpha",
                str(alpha),
                "--small",
                str(small),
                *common,
                *extra,
            ],
            work / f"log-spark-{alpha}.txt",
        )
        pairs.append({"baseline": base, "spark": sp})
        if "profile" in sp:
            sp["profile"]["alpha"] = alpha
            profiles.append(sp["profile"])
    sweep: List[Dict[str, Any]] = []
    sweep_raw = []
    if args.partitions:
        for master in args.masters:
            print(
                f"  sweep {master} alpha {args.sweep_alpha}: partitions {args.partitions} ...",
                flush=True,
            )
            sp = run_worker(
                script,
                [
                    "--_worker",
                    "spark",
                    "--master",
                    master,
                    "--alpha",
                    str(args.sweep_alpha),
                    "--partitions",
                    ",".join(map(str, args.partitions)),
                    "--sweep-repeats",
                    str(args.sweep_repeats),
                    *common[:6],
                    "--repeats",
                    "1",
                ],
                work / f"log-sweep-{master}.txt",
            )
            sweep_raw.append(sp)
            b = max(p["img_s"] for p in sp["baseline"])
            for s in sp["sweep"]:
                s.update(
                    master=master, alpha=args.sweep_alpha, baseline_img_s=b, ratio=s["img_s"] / b
                )
                sweep.append(s)
    rows = summarise(pairs)
    info["loadavg_end"] = list(os.getloadavg())
    print()
    tables = print_tables(rows, sweep, profiles)
    stem = args.stem or ("featurize_quick" if args.quick else "featurize")
    data = {
        "benchmark": "featurize",
        "command": " ".join(["python", "benchmarks/featurize_bench.py", *sys.argv[1:]]),
        "machine": info,
        "images": n_images,
        "input": args.images,
        "summary": rows,
        "sweep": sweep,
        "raw": {"pairs": pairs, "sweep": sweep_raw},
        "goal": {"ratio": 0.9, "met_warm": all(r["warm_ratio"] >= 0.9 for r in rows)},
        "img_per_core_s": {str(r["alpha"]): r["img_per_core_s"] for r in rows},
    }
    path = write_results(stem, data, tables)
    plot(rows, sweep, RESULTS_DIR / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="alpha 0.35, one warm run, no sweep (~2 min)"
    )
    p.add_argument(
        "--images",
        default=str(SHARED_IMAGES if SHARED_IMAGES.is_dir() else SAMPLE_IMAGES),
        help="folder of <Class>/<image>.jpg (default: the 1000 shared images)",
    )
    p.add_argument("--alphas", default=None, help="comma-separated (default 0.35,1.0; quick 0.35)")
    p.add_argument(
        "--repeats", type=int, default=None, help="warm runs, best kept (default 3; quick 1)"
    )
    p.add_argument(
        "--partitions",
        default=None,
        help="sweep, comma-separated (default 1,2,4,8,32,128; quick none)",
    )
    p.add_argument("--masters", default="local[1],local[2]", help="sweep masters, comma-separated")
    p.add_argument("--sweep-alpha", type=float, default=0.35)
    p.add_argument("--sweep-repeats", type=int, default=1)
    p.add_argument(
        "--profile", action="store_true", help="also a warm job under cProfile in the workers"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each measurement wait up to this many s for other jobs to calm (default 30;"
        " quick 0)",
    )
    p.add_argument(
        "--code",
        default=None,
        help="a folder holding a patched copy of stages/ to measure instead (A/B of a change)",
    )
    p.add_argument("--workdir", default="/tmp/fruits-bench-featurize")
    p.add_argument("--stem", default=None, help="results/<stem>.json|png")
    # Worker-only options.
    p.add_argument("--_worker", choices=["baseline", "spark"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--alpha", type=float, default=0.35, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="local[2]", help=argparse.SUPPRESS)
    p.add_argument("--small", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point (parent or ``--_worker``)."""
    quiet_env()
    args = build_parser().parse_args(argv)
    if args._worker:
        args.partitions = [int(x) for x in args.partitions.split(",")] if args.partitions else []
        args.repeats = args.repeats if args.repeats is not None else 1
        args.quiet_wait = args.quiet_wait or 0.0
        fn = worker_baseline if args._worker == "baseline" else worker_spark
        emit(fn(args))
        return 0
    # Workers run in the work folder (so that a --code copy wins over ./stages): absolute paths.
    args.images = str(Path(args.images).resolve())
    args.workdir = str(Path(args.workdir).resolve())
    if args.code:
        os.environ["FRUITS_BENCH_CODE"] = str(Path(args.code).resolve())
    args.alphas = [
        float(a) for a in (args.alphas or ("0.35" if args.quick else "0.35,1.0")).split(",")
    ]
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 30.0
    if args.partitions is None:
        args.partitions = "" if args.quick else "1,2,4,8,32,128"
    args.partitions = [int(x) for x in args.partitions.split(",") if x]
    args.masters = [m for m in args.masters.split(",") if m]
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
