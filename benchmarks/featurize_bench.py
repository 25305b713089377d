"""Stage 1 throughput: the Spark featurize job against single processes doing the same work.

Two baselines, each a single Python process on the same cores decoding the same JPEGs
from disk with :func:`stages.featurize.images.decode_image` and :func:`preprocess`: **Keras**
(:func:`stages.featurize.model.local_featurizer`, a compiled ``tf.function``, batches of 64,
decoding one photo after another) and **LiteRT**, the fair single-process limit
(:mod:`benchmarks.litert_limit`: the flatbuffer the Spark job broadcasts, converted
beforehand and read from a file, decode on a thread pool overlapping inference,
XNNPACK with as many threads as cores, batches of 16).  The Spark job runs its
default engine (LiteRT) and batch.  Every figure is a ratio to a baseline measured
in the same run:

* **cold**: the first job of a fresh SparkSession (driver: weights and, for random
  weights, TensorFlow import and conversion; workers start, interpreter build) against
  a fresh process's first pass (imports, weights or conversion, build, pass 1); the
  JVM start is reported apart.  Each subprocess has an empty conversion cache.
* **warm**: a second job in the same session (new output) against warm passes of
  both baselines run in the *same* driver process, interleaved with the Spark runs.
* **steady**: ``(N - 64) / (t_N - t_64)`` from a full run and a 64-image run, so the
  per-job one-off costs drop out.
* **whole process** (``--whole``): wall time of ``python -m stages.cli featurize`` as
  a user runs it (JVM start included) against plain single-process scripts (Keras,
  LiteRT) that list, decode, featurize and write the same Parquet columns; plus the
  cold start of ``make demo``'s featurize (100 sample images) with each engine.

Image counts other than the folder's (``--sizes 1000,4099,5000``) are built by
copying the folder's images (under new names) into the work folder.  Each
configuration runs in its own subprocess (``--_worker``): one SparkSession per
master, and memory that is its own.  Python worker RSS is sampled in a thread.

Usage::

    python benchmarks/featurize_bench.py --quick      # alpha 0.35, 1000 images, ~3 min
    python benchmarks/featurize_bench.py              # alphas 0.35 and 1.0, best of 3, sweep
    python benchmarks/featurize_bench.py --sizes 1000,4099,5000 --alphas 0.35 --whole
    python benchmarks/featurize_bench.py --profile    # + cProfile inside the workers
    python benchmarks/featurize_bench.py --limit --sizes 5000 --repeats 3   # vs the limit
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import pstats
import re
import shutil
import subprocess
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
    quiet_env,
    run_worker,
    wait_quiet,
    write_results,
)
from benchmarks._table import Col, pct, pyplot, records_table, save_figure, show_tables, table

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

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already ran here (the driver's TFLite conversion): all cores
    _ = (tf.constant(1.0) + 1.0).numpy()  # starts the runtime: later settings are refused
    return time.perf_counter() - t0


def baseline_pass(
    files: Sequence[str], featurize: Callable, batch: int = BATCH
) -> Dict[str, float]:
    """One single-process pass: read, decode, preprocess, infer in batches of ``batch``."""
    import numpy as np
    import psutil

    from stages.featurize.images import decode_image, preprocess

    t_read = t_decode = t_infer = 0.0
    sys0 = psutil.cpu_times()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        a = time.perf_counter()
        blobs = []
        for p in files[i : i + batch]:
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
    return _pass_result(len(files), t0, cpu0, sys0, t_read, t_decode, t_infer)


def _pass_result(
    images: int,
    t0: float,
    cpu0: float,
    sys0,
    read_s: float = float("nan"),
    decode_s: float = float("nan"),
    infer_s: float = float("nan"),
) -> Dict[str, Any]:
    """One baseline pass's figures since ``t0``/``cpu0``/``sys0`` (the machine's CPU times):
    wall and CPU seconds, the share of the CPU other processes used meanwhile, img/s."""
    import psutil

    total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    sys1 = psutil.cpu_times()
    busy = (sum(sys1) - sum(sys0)) - (sys1.idle - sys0.idle) - (sys1.iowait - sys0.iowait)
    return {
        "seconds": total,
        "cpu_s": cpu,
        "others_share": max(0.0, busy - cpu) / (total * (os.cpu_count() or 1)),
        "images": images,
        "img_s": images / total,
        "read_s": read_s,
        "decode_preprocess_s": decode_s,
        "infer_s": infer_s,
    }


def make_copies(src: str, dst: Path, n: int) -> Path:
    """``n`` images in ``dst``: the images of ``src`` copied round-robin under new names."""
    files = list_images(src)
    if dst.exists() and len(list_images(str(dst))) == n:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for i in range(n):
        f = Path(files[i % len(files)])
        target = dst / f.parent.name / f"c{i // len(files)}_{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return dst


def limit_pass(limit, files: Sequence[str]) -> Dict[str, float]:
    """One pass of the fair single-process limit (:class:`benchmarks.litert_limit.Limit`):
    decode on a thread pool overlapping inference; timed like :func:`baseline_pass`
    (its decode and inference overlap, so only the whole is given)."""
    import psutil

    sys0 = psutil.cpu_times()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    limit.featurize_files(files)
    return _pass_result(len(files), t0, cpu0, sys0)


def baseline_model(engine: str, alpha: float, threads: int) -> Dict[str, Any]:
    """A single-process featurizer: ``{"featurize", "infer", "batch", "import_s", "build_s"}``.

    ``threads`` 0: all cores.  Keras imports TensorFlow (intra-op threads set first),
    decodes one photo after another, batches of 64.  LiteRT is the fair limit
    (:mod:`benchmarks.litert_limit`): the flatbuffer the Spark job broadcasts, read
    from a file prepared beforehand (for random weights the conversion runs here,
    counted in ``build_s`` only), decode on a thread pool, batches of 16.
    """
    if engine == "keras":
        t_import = init_tf_threads(threads)
        from stages.featurize.model import local_featurizer, resolve_weights

        t0 = time.perf_counter()
        spec, weights = resolve_weights(weights_for(alpha), alpha)
        featurize = local_featurizer(weights, spec.alpha)
        return {
            "featurize": lambda files: baseline_pass(files, featurize, BATCH),
            "infer": featurize,
            "batch": BATCH,
            "import_s": t_import,
            "build_s": time.perf_counter() - t0,
        }
    t0 = time.perf_counter()
    from benchmarks.litert_limit import BATCH as LIMIT_BATCH
    from benchmarks.litert_limit import Limit, model_file

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    limit = Limit(model_file(alpha), threads)
    return {
        "featurize": lambda files: limit_pass(limit, files),
        "infer": limit.infer,
        "batch": LIMIT_BATCH,
        "import_s": t_import,
        "build_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------- workers (subprocesses)


def worker_baseline(args) -> Dict[str, Any]:
    """A fresh process: cold pass (imports + weights + build + pass 1), then warm passes."""
    t0 = time.perf_counter()
    m = baseline_model(args.engine, args.alpha, args.threads)
    files = list_images(args.images)
    cold = m["featurize"](files)
    cold_total = time.perf_counter() - t0
    warm = [_baseline(files, m["featurize"], args) for _ in range(args.repeats)]
    return {
        "kind": "baseline",
        "engine": args.engine,
        "alpha": args.alpha,
        "threads": args.threads,
        "import_s": m["import_s"],
        "weights_and_build_s": m["build_s"],
        "cold_pass": cold,
        "cold_total_s": cold_total,
        "cold_img_s": len(files) / cold_total,
        "warm_passes": warm,
        "max_rss_mib": max_rss_mib(),
    }


def _quiet(args) -> Dict[str, float]:
    return wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else {}


def _baseline(files: Sequence[str], run_pass: Callable, args) -> Dict[str, Any]:
    quiet = _quiet(args)
    return {**run_pass(files), "quiet": quiet}


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
            partitions=partitions,
            overwrite=True,
            engine=args.engine,
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
        "workers": d["python_workers"],
        "memory": sampler.result(),
        "cpu_s": sampler.cpu_seconds(),
        "machine_cpu_s": machine,
    }


def worker_spark(args) -> Dict[str, Any]:
    """One SparkSession on ``args.master``: cold job, then warm jobs interleaved with
    single-process Keras and LiteRT passes in this driver, then the partition sweep."""
    cores = cores_of(args.master)
    from stages.base.session import spark_session

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
        "engine": args.engine,
        "session_start_s": t_session,
    }
    result["cold"] = _spark_run(spark, args.images, str(work / "cold"), args)
    files = list_images(args.images)
    result["baseline"] = {"keras": [], "litert": []}
    models = {}
    for engine in args.baselines:
        t0 = time.perf_counter()
        models[engine] = baseline_model(engine, args.alpha, cores)["featurize"]
        models[engine](files[:BATCH])  # traces / warms: not timed
        result[f"baseline_{engine}_build_s"] = time.perf_counter() - t0
    result["warm"], result["small"] = [], []
    for r in range(args.repeats):
        for engine in args.baselines:
            result["baseline"][engine].append(_baseline(files, models[engine], args))
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
    if args.partitions:  # drift check after the sweep
        for engine in args.baselines:
            result["baseline"][engine].append(_baseline(files, models[engine], args))
    if args.profile:
        result["profile"] = _profile_job(spark, work, args)
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)
    return result


def worker_script(args) -> Dict[str, Any]:
    """A plain single-process script, start to finish: list, decode, featurize, write.

    What a user would write without Spark (same decode, batches of 64, the same
    Parquet columns); timed by the parent as a whole process.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.featurize.images import DecodeError, decode_image, preprocess

    if args.engine == "litert":
        from benchmarks.litert_limit import model_file, run

        run(args.images, args.out, model_file(args.alpha))
        return {"kind": "script", "engine": args.engine, "images": len(list_images(args.images))}
    m = baseline_model(args.engine, args.alpha, 0)
    featurize, batch = m["infer"], m["batch"]
    files = list_images(args.images)
    paths, labels, feats, errors = [], [], [], []
    for i in range(0, len(files), batch):
        ok, arrays = [], []
        for f in files[i : i + batch]:
            with open(f, "rb") as fh:
                data = fh.read()
            try:
                arrays.append(decode_image(data))
                ok.append(f)
            except DecodeError as exc:
                paths.append(f)
                labels.append(Path(f).parent.name)
                feats.append(None)
                errors.append(str(exc))
        if arrays:
            out = featurize(preprocess(np.stack(arrays)))
            paths += ok
            labels += [Path(f).parent.name for f in ok]
            feats += list(out)
            errors += [None] * len(ok)
    valid = np.array([f is not None for f in feats], dtype=bool)
    values = np.concatenate([f for f in feats if f is not None] or [np.zeros(0, np.float32)])
    offsets = np.zeros(len(feats) + 1, np.int32)
    offsets[1:] = np.cumsum(valid) * 1280
    features = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values.ravel()), mask=pa.array(~valid)
    )
    table_ = pa.table(
        {
            "path": paths,
            "label": labels,
            "features": features,
            "error": pa.array(errors, pa.string()),
        }
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    pq.write_table(table_, str(Path(args.out) / "part-0.parquet"))
    return {"kind": "script", "engine": args.engine, "images": len(files)}


# ---------------------------------------------------------------- profiling inside workers


def _profiled_featurize_partition(batches, *a, **kw):
    """Executor side: :func:`stages.featurize.frame.featurize_partition` under cProfile.

    The profiler stays on while the generator is suspended, so the serialiser's work
    on the yielded Arrow batches (writing to the JVM) and the reads of the next input
    batches are in the profile too (as top-level calls).
    """
    import cProfile
    import os as os_
    import time as time_

    import stages.featurize.frame as sf

    prof = cProfile.Profile()
    t0 = time_.perf_counter()
    n = 0
    prof.enable()
    try:
        for batch in sf.featurize_partition(batches, *a, **kw):
            n += batch.num_rows
            yield batch
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
    import stages.featurize.frame as sf

    shutil.rmtree(PROFILE_DIR, ignore_errors=True)
    sf.featurize_partition = _profiled_featurize_partition


def _profile_job(spark, work: Path, args) -> Dict[str, Any]:
    """A warm job under the profilers: per-task cProfile and driver-side phase timers."""
    import stages.featurize.frame as sf

    phases: Dict[str, float] = {}

    def timed(name: str, fn: Callable) -> Callable:
        def inner(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        return inner

    saved = sf.prepare_model, sf.walk_images, sf.make_view
    sf.prepare_model = timed("driver: prepare_model (weights, flatbuffer)", sf.prepare_model)
    sf.walk_images = timed("driver: list the local input", sf.walk_images)
    sf.make_view = timed("driver: the view of symlinks", sf.make_view)
    shutil.rmtree(PROFILE_DIR, ignore_errors=True)
    start_ms = time.time() * 1000
    try:
        run = _spark_run(spark, args.images, str(work / "profiled"), args)
    finally:
        sf.prepare_model, sf.walk_images, sf.make_view = saved
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
    ("model build (get_featurizer)", r"_build_featurizer|get_featurizer|litert_featurizer"),
    ("inference (LiteRT invoke)", r"\(invoke\)|method 'Invoke'"),
    ("inference (TF graph)", r"TFE_Py_Execute|quick_execute|_call_flat|__call__.*polymorphic"),
    ("JPEG decode + resize (Pillow)", r"decode_image"),
    ("preprocess (uint8 -> float32)", r"\(preprocess\)"),
    ("input Arrow batch to bytes (as_py)", r"method 'as_py'|\(as_py\)"),
    ("output Arrow batch (from_arrays)", r"from_arrays"),
    ("Arrow JVM <-> Python", r"ipc|_load_from_socket|read_batch|write_batch|dump_stream"),
    ("broadcast value (model)", r"broadcast\.py.*value|_load"),
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


def _best_img_s(passes: Sequence[Dict[str, Any]]) -> float:
    return max((p["img_s"] for p in passes), default=float("nan"))


def summarise(pairs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per image count and alpha: cold, warm and steady throughput and their ratios."""
    rows = []
    for pair in pairs:
        bases, sp = pair["baseline"], pair["spark"]
        warm = _best(sp["warm"])
        small = _best(sp["small"]) if sp["small"] else None
        n_full, n_small = warm["images"], small["images"] if small else 0
        steady = (
            (n_full - n_small) / (warm["seconds"] - small["seconds"])
            if small and warm["seconds"] > small["seconds"]
            else float("nan")
        )
        cold_img_s = sp["cold"]["images"] / sp["cold"]["seconds"]
        row: Dict[str, Any] = {
            "images": n_full,
            "alpha": sp["alpha"],
            "weights": weights_for(sp["alpha"]),
            "engine": sp["engine"],
            "tasks": warm["tasks"],
            "spark_cold_img_s": cold_img_s,
            "spark_warm_img_s": warm["img_s"],
            "spark_steady_img_s": steady,
            "session_start_s": sp["session_start_s"],
            "cold_job_s": sp["cold"]["seconds"],
            "warm_job_s": warm["seconds"],
            "small_job_s": small["seconds"] if small else None,
            "one_off_cold_s": sp["cold"]["seconds"] - n_full / steady if steady == steady else None,
            "one_off_warm_s": warm["seconds"] - n_full / steady if steady == steady else None,
            "model_builds_cold": sp["cold"]["model_builds"],
            "model_builds_warm": warm["model_builds"],
            "worker_peak_mib": max(
                r["memory"]["worker_peak_mib"] for r in [sp["cold"], *sp["warm"]]
            ),
            "workers_sum_peak_mib": max(
                r["memory"]["workers_sum_peak_mib"] for r in [sp["cold"], *sp["warm"]]
            ),
            "warm_repeats_s": [r["seconds"] for r in sp["warm"]],
            "warm_cpu_s": warm["cpu_s"],
            "others_share_warm": warm["others_share"],
            "cpu_s_per_1000_warm": 1000 * sum(warm["cpu_s"].values()) / n_full,
            # Steady state per executor core (what a cluster of many cores approaches).
            "img_per_core_s": (steady if steady == steady else warm["img_s"]) / sp["cores"],
        }
        for engine, base in bases.items():
            in_driver = sp["baseline"].get(engine) or []
            b_warm = _best_img_s(in_driver)
            row.update(
                {
                    f"{engine}_cold_img_s": base["cold_img_s"],
                    f"{engine}_cold_s": base["cold_total_s"],
                    f"{engine}_warm_img_s": b_warm,
                    f"{engine}_warm_img_s_fresh_process": _best_img_s(base["warm_passes"]),
                    f"{engine}_process_peak_mib": base["max_rss_mib"],
                    f"{engine}_import_s": base["import_s"],
                    f"{engine}_build_s": base["weights_and_build_s"],
                    f"cold_ratio_{engine}": cold_img_s / base["cold_img_s"],
                    f"warm_ratio_{engine}": warm["img_s"] / b_warm,
                    f"steady_ratio_{engine}": steady / b_warm,
                    f"{engine}_decode_share": (
                        _best(in_driver)["decode_preprocess_s"] / _best(in_driver)["seconds"]
                        if in_driver
                        else None
                    ),
                    f"others_share_{engine}": _best(in_driver)["others_share"]
                    if in_driver
                    else None,
                }
            )
        rows.append(row)
    return rows


# One row per image count and alpha (``summarise``).
THROUGHPUT_COLS = [
    Col("images", "images"),
    Col("alpha", "alpha"),
    Col("tasks", "tasks"),
    Col("Keras warm img/s", "keras_warm_img_s"),
    Col("LiteRT warm img/s", "litert_warm_img_s"),
    Col("Spark warm img/s", "spark_warm_img_s"),
    Col("warm ÷ Keras", "warm_ratio_keras"),
    Col("warm ÷ LiteRT", "warm_ratio_litert"),
    Col("cold ÷ Keras", "cold_ratio_keras"),
    Col("cold ÷ LiteRT", "cold_ratio_litert"),
    Col("steady ÷ LiteRT", "steady_ratio_litert"),
    Col("worker peak MiB", "worker_peak_mib"),
]
TIMES_COLS = [
    Col("images", "images"),
    Col("alpha", "alpha"),
    Col("session start s", "session_start_s"),
    Col("Spark cold job s", "cold_job_s"),
    Col("Keras cold s", "keras_cold_s"),
    Col("LiteRT cold s", "litert_cold_s"),
    Col("Spark warm job s", "warm_job_s"),
    Col(f"{SMALL}-img warm job s", "small_job_s"),
    Col("one-off cold s", "one_off_cold_s"),
    Col("one-off warm s", "one_off_warm_s"),
    Col("builds cold / warm", lambda r: f"{r['model_builds_cold']} / {r['model_builds_warm']}"),
    Col("LiteRT decode share", "litert_decode_share"),
    Col(
        "Keras / LiteRT process MiB",
        lambda r: "{:.0f} / {:.0f}".format(
            r.get("keras_process_peak_mib", float("nan")),
            r.get("litert_process_peak_mib", float("nan")),
        ),
    ),
    Col("others' CPU (Spark warm)", lambda r: pct(r["others_share_warm"])),
]
# One row per (master, partitions) of the sweep.
SWEEP_COLS = [
    Col("master", "master"),
    Col("alpha", "alpha"),
    Col("images", "images"),
    Col("partitions", "partitions_requested"),
    Col("tasks", "tasks"),
    Col("img/s", "img_s"),
    Col("÷ LiteRT", "ratio"),
    Col("LiteRT img/s", "baseline_img_s"),
    Col("worker peak MiB", "memory.worker_peak_mib"),
    Col("workers", "memory.workers_seen"),
    Col("others' CPU", lambda s: pct(s["others_share"])),
]
# One row per image count of ``whole_process``.
WHOLE_COLS = [
    Col("images", "images"),
    Col("fruits-pipeline featurize s", "cli_s"),
    Col("Keras script s", "keras_script_s"),
    Col("LiteRT script s", "litert_script_s"),
    Col("CLI vs Keras script", lambda w: w["keras_script_s"] / w["cli_s"]),
    Col("CLI vs LiteRT script", lambda w: w["litert_script_s"] / w["cli_s"]),
]


def _profile_table(prof: Dict[str, Any]) -> str:
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
    return f"profile alpha={prof['alpha']} images={prof['images']}\n" + table(
        ["where", "seconds"], lines
    )


def print_tables(
    rows: List[Dict[str, Any]],
    sweep: List[Dict[str, Any]],
    profiles,
    whole: Optional[Dict[str, Any]] = None,
) -> List[str]:
    """Print and return the tables."""
    out = [records_table(THROUGHPUT_COLS, rows), records_table(TIMES_COLS, rows)]
    if sweep:
        out.append(records_table(SWEEP_COLS, sweep))
    if whole:
        out.append(records_table(WHOLE_COLS, whole["sizes"]))
        out.append(
            table(
                ["make demo's featurize (100 images), whole process", "seconds"],
                [[f"--engine {e}", s] for e, s in whole["demo_cold_s"].items()],
            )
        )
    out += [_profile_table(prof) for prof in profiles]
    show_tables(out)
    return out


def plot(rows: List[Dict[str, Any]], sweep: List[Dict[str, Any]], path: Path) -> None:
    """Warm ratios per image count and alpha, and img/s against partitions."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    kinds = [("warm_ratio_keras", "warm ÷ Keras"), ("warm_ratio_litert", "warm ÷ LiteRT")]
    width = 0.35
    for i, (kind, label) in enumerate(kinds):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [r.get(kind, float("nan")) for r in rows],
            width,
            label=label,
        )
    ax.axhline(4.0, color="k", ls="--", lw=1, label="goal ÷ Keras 4")
    ax.axhline(0.95, color="grey", ls=":", lw=1, label="goal ÷ LiteRT 0.95")
    ax.set_xticks([j + width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['images']} img\nalpha {r['alpha']}" for r in rows], fontsize=8)
    ax.set_ylabel("Spark img/s ÷ single-process img/s")
    ax.set_title("featurize (LiteRT engine, local[2]) vs single processes")
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
        ax.axhline(0.95, color="k", ls="--", lw=1)
        ax.set_xlabel("partitions")
        ax.set_ylabel("ratio to single-process LiteRT (same cores)")
        ax.set_title(f"partition sweep, alpha {sweep[0]['alpha']}, {sweep[0]['images']} images")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _fresh_cache(work: Path, name: str) -> None:
    """An empty TFLite conversion cache for the next subprocess (cold means cold)."""
    path = work / "cache" / name
    shutil.rmtree(path, ignore_errors=True)
    os.environ["FRUITS_CACHE"] = str(path)


def _timed_process(cmd: Sequence[str], log: Path) -> float:
    """Wall seconds of a whole process, as ``time`` gives them; fails loudly."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [env.get("FRUITS_BENCH_CODE", ""), str(ROOT), env.get("PYTHONPATH", "")] if p
    )
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}), see {log}")
    return seconds


def whole_process(args, inputs: Dict[int, str], work: Path) -> Dict[str, Any]:
    """``fruits-pipeline featurize`` against plain scripts, each a whole process."""
    script = str(Path(__file__).resolve())
    py = sys.executable
    out: Dict[str, Any] = {"sizes": [], "demo_cold_s": {}}
    for size, images in inputs.items():
        print(f"  whole process, {size} images: CLI, Keras script, LiteRT script ...", flush=True)
        row: Dict[str, Any] = {"images": size}
        _quiet(args)
        _fresh_cache(work, f"whole-cli-{size}")
        row["cli_s"] = _timed_process(
            [py, "-m", "stages.cli", "featurize", images, str(work / "whole-out"), "--overwrite"],
            work / f"log-whole-cli-{size}.txt",
        )
        for engine in ("keras", "litert"):
            _quiet(args)
            _fresh_cache(work, f"whole-{engine}-{size}")
            row[f"{engine}_script_s"] = _timed_process(
                [py, script, "--_worker", "script", "--engine", engine, "--images", images]
                + ["--out", str(work / f"whole-{engine}"), "--workdir", str(work)],
                work / f"log-whole-{engine}-{size}.txt",
            )
        out["sizes"].append(row)
    for engine in ("litert", "keras"):
        print(f"  make demo's featurize on the sample, --engine {engine} ...", flush=True)
        _quiet(args)
        out["demo_cold_s"][engine] = _timed_process(
            [py, "-m", "stages.cli", "featurize", str(SAMPLE_IMAGES), str(work / "demo-out")]
            + ["--weights", "bundled", "--engine", engine, "--overwrite"],
            work / f"log-demo-{engine}.txt",
        )
    return out


def parent(args) -> int:
    """Run the configurations in subprocesses, then print, save and plot."""
    script = Path(__file__).resolve()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_folder = len(list_images(args.images))
    sizes = args.sizes or [n_folder]
    inputs = {
        n: args.images if n == n_folder else str(make_copies(args.images, work / f"copies-{n}", n))
        for n in sizes
    }
    small = make_subset(args.images, work / "small", SMALL)
    info = machine_info()
    print(f"featurize bench: {sizes} images from {args.images}; load {info['loadavg_1_5_15']}")
    common = [
        "--workdir",
        str(work),
        "--quiet-wait",
        str(args.quiet_wait),
        "--repeats",
        str(args.repeats),
    ]
    pairs = []
    profiles = []
    for size, images in inputs.items():
        for alpha in args.alphas:
            bases = {}
            for engine in args.baselines:
                print(f"  {size} images, alpha {alpha}: {engine} single process ...", flush=True)
                _fresh_cache(work, f"base-{engine}-{size}-{alpha}")
                bases[engine] = run_worker(
                    script,
                    ["--_worker", "baseline", "--engine", engine, "--alpha", str(alpha)]
                    + ["--threads", "0", "--images", images, *common],
                    work / f"log-baseline-{engine}-{size}-{alpha}.txt",
                )
            print(f"  {size} images, alpha {alpha}: Spark local[2], cold + warm ...", flush=True)
            _fresh_cache(work, f"spark-{size}-{alpha}")
            extra = ["--profile"] if args.profile else []
            sp = run_worker(
                script,
                ["--_worker", "spark", "--master", "local[2]", "--alpha", str(alpha)]
                + ["--images", images, "--small", str(small), *common, *extra]
                + ["--baselines", ",".join(args.baselines)],
                work / f"log-spark-{size}-{alpha}.txt",
            )
            pairs.append({"size": size, "baseline": bases, "spark": sp})
            if "profile" in sp:
                sp["profile"].update(alpha=alpha, images=size)
                profiles.append(sp["profile"])
    sweep: List[Dict[str, Any]] = []
    sweep_raw = []
    if args.partitions:
        images = inputs[args.sweep_size] if args.sweep_size in inputs else args.images
        for master in args.masters:
            print(
                f"  sweep {master} alpha {args.sweep_alpha}: partitions {args.partitions} ...",
                flush=True,
            )
            sp = run_worker(
                script,
                ["--_worker", "spark", "--master", master, "--alpha", str(args.sweep_alpha)]
                + ["--partitions", ",".join(map(str, args.partitions))]
                + ["--sweep-repeats", str(args.sweep_repeats), "--images", images]
                + [*common[:4], "--repeats", "1", "--baselines", "litert"],
                work / f"log-sweep-{master}.txt",
            )
            sweep_raw.append(sp)
            b = _best_img_s(sp["baseline"]["litert"])
            for s in sp["sweep"]:
                s.update(
                    master=master, alpha=args.sweep_alpha, baseline_img_s=b, ratio=s["img_s"] / b
                )
                sweep.append(s)
    # The whole-process comparison at the largest count only (the Keras script is slow).
    biggest = max(inputs)
    whole = whole_process(args, {biggest: inputs[biggest]}, work) if args.whole else None
    rows = summarise(pairs)
    info["loadavg_end"] = list(os.getloadavg())
    print()
    tables = print_tables(rows, sweep, profiles, whole)
    stem = args.stem or ("featurize_quick" if args.quick else "featurize")
    data = {
        "benchmark": "featurize",
        "command": " ".join(["python", "benchmarks/featurize_bench.py", *sys.argv[1:]]),
        "machine": info,
        "sizes": sizes,
        "input": args.images,
        "summary": rows,
        "sweep": sweep,
        "whole_process": whole,
        "raw": {"pairs": pairs, "sweep": sweep_raw},
        "goal": {
            "warm_ratio_keras": 4.0,
            "warm_ratio_litert": 0.95,
            "worker_peak_mib": 400,
            "demo_cold_s": 10,
        },
        "img_per_core_s": {f"{r['alpha']}@{r['images']}": r["img_per_core_s"] for r in rows},
    }
    path = write_results(stem, data, tables)
    plot(rows, sweep, RESULTS_DIR / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="alpha 0.35, one warm run, no sweep (~3 min)"
    )
    p.add_argument(
        "--images",
        default=str(SHARED_IMAGES if SHARED_IMAGES.is_dir() else SAMPLE_IMAGES),
        help="folder of <Class>/<image>.jpg (default: the 1000 shared images)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="image counts, comma-separated, made by copying --images (default: as many as "
        "the folder holds)",
    )
    p.add_argument("--alphas", default=None, help="comma-separated (default 0.35,1.0; quick 0.35)")
    p.add_argument(
        "--baselines", default="keras,litert", help="single-process engines, comma-separated"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="warm runs, best kept (default 3; quick 1)"
    )
    p.add_argument(
        "--partitions",
        default=None,
        help="sweep, comma-separated (default 1,2,4,8,16,32; quick none)",
    )
    p.add_argument("--masters", default="local[2]", help="sweep masters, comma-separated")
    p.add_argument("--sweep-alpha", type=float, default=0.35)
    p.add_argument("--sweep-size", type=int, default=None, help="sweep image count (a --sizes)")
    p.add_argument("--sweep-repeats", type=int, default=1)
    p.add_argument(
        "--whole",
        action="store_true",
        help="also whole-process times at the largest --sizes: fruits-pipeline featurize vs "
        "plain scripts, and the demo's cold start",
    )
    p.add_argument(
        "--profile", action="store_true", help="also a warm job under cProfile in the workers"
    )
    p.add_argument(
        "--render-rounds",
        action="store_true",
        help="with --limit: only tabulate the rounds kept in --workdir by an earlier run",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --limit: also featurize with this environment variable, each round",
    )
    p.add_argument(
        "--limit",
        action="store_true",
        help="only whole processes: fruits-pipeline featurize against the fair single-process "
        "limit (benchmarks/litert_limit.py) at the largest --sizes, --repeats pairs per alpha",
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
    p.add_argument(
        "--_worker", choices=["baseline", "spark", "script"], default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--alpha", type=float, default=0.35, help=argparse.SUPPRESS)
    p.add_argument("--engine", default="litert", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="local[2]", help=argparse.SUPPRESS)
    p.add_argument("--small", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point (parent or ``--_worker``)."""
    quiet_env()
    args = build_parser().parse_args(argv)
    args.baselines = [b for b in args.baselines.split(",") if b]
    if args._worker:
        args.partitions = [int(x) for x in args.partitions.split(",")] if args.partitions else []
        args.repeats = args.repeats if args.repeats is not None else 1
        args.quiet_wait = args.quiet_wait or 0.0
        fn = {"baseline": worker_baseline, "spark": worker_spark, "script": worker_script}
        emit(fn[args._worker](args))
        return 0
    # Workers run in the work folder (so that a --code copy wins over ./stages): absolute paths.
    args.images = str(Path(args.images).resolve())
    args.workdir = str(Path(args.workdir).resolve())
    if args.code:
        os.environ["FRUITS_BENCH_CODE"] = str(Path(args.code).resolve())
    args.alphas = [
        float(a) for a in (args.alphas or ("0.35" if args.quick else "0.35,1.0")).split(",")
    ]
    args.sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 30.0
    if args.partitions is None:
        args.partitions = "" if args.quick else "1,2,4,8,16,32"
    args.partitions = [int(x) for x in args.partitions.split(",") if x]
    args.masters = [m for m in args.masters.split(",") if m]
    if args.limit:
        return limit_parent(args)
    return parent(args)


def limit_parent(args) -> int:
    """``--limit``: the whole-process pairs of :func:`benchmarks.limit_ab.limit_ab`."""
    from benchmarks.limit_ab import limit_ab, limit_table, rows_from_saved_rounds

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_folder = len(list_images(args.images))
    size = max(args.sizes or [n_folder])
    images = (
        args.images
        if size == n_folder
        else str(make_copies(args.images, work / f"copies-{size}", size))
    )
    info = machine_info()
    print(f"featurize vs the limit: {size} images; load {info['loadavg_1_5_15']}", flush=True)
    if args.render_rounds:
        rows = rows_from_saved_rounds(work)
    else:
        variants = {f"featurize {v}": dict([v.split("=", 1)]) for v in args.variant}
        rows = limit_ab(images, args.alphas, args.repeats, work, variants)
    info["loadavg_end"] = list(os.getloadavg())
    tables = [limit_table(rows)]
    show_tables(tables)
    data = {
        "benchmark": "featurize_limit",
        "command": " ".join(["python", "benchmarks/featurize_bench.py", *sys.argv[1:]]),
        "machine": info,
        "rows": rows,
        "goal": {
            "speed_ratio": {"1.0": 0.85, "0.35": 0.6},
            "cpu_ratio": 1.25,
            "worker_peak_mib": 400,
        },
    }
    path = write_results(args.stem or "featurize_limit", data, tables)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
