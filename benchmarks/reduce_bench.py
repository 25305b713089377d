"""Stage 2 speed: our reduce against Spark ML and against single-process numpy, same data.

For each features Parquet (synthetic low rank + noise, and the real MobileNetV2
features of the shared images), in one run and one SparkSession per data set:

* **ours**: :func:`stages.reduce.full.reduce_features` (read + cache, one treeAggregate,
  ``eigh``, project, write ``projections/``, ``pca_model/``, ``summary.json``);
* **Spark ML**: ``StandardScaler(withMean=True, withStd=True)`` + ``PCA(k)`` fit,
  transform and Parquet write of ``path, label, pca`` (input vectors cached, as a
  Spark user would: that only helps Spark ML);
* **numpy**: one process, pyarrow read, float64, mean and covariance with one GEMM,
  ``scipy.linalg.eigh``, project, pyarrow write (a subprocess, for its own memory).

Ratios: Spark ML time / ours (goal >= 5), ours / numpy (goal <= 1.3, issue 4; <= 1.5,
issue 6).  Memory: peak RSS of the driver (Python + JVM), the executors (JVM and
Python workers; in ``local[N]`` the JVM is driver and executor at once, so the full run
also measures ours under ``local-cluster``, whose executors are JVMs of their own).

Usage::

    python benchmarks/reduce_bench.py --quick     # 20k x 1280 + the 100-image sample, ~2 min
    python benchmarks/reduce_bench.py             # 10k, 30k, 100k (1M if memory allows),
                                                  # d = 4096, partitions 2-64, real features
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # site-packages has a
if os.environ.get("FRUITS_BENCH_CODE"):  # `benchmarks` of its own; --code: patched stages
    sys.path.insert(0, os.environ["FRUITS_BENCH_CODE"])

from benchmarks._common import (
    JSON_MARK,
    MIB,
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
from benchmarks._table import Col, pct, pyplot, records_table, save_figure, sci, show_tables

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "fruits360"
SAMPLE_IMAGES = ROOT / "sample" / "fruits360"
RANK = 24
ROW_GROUP = 1024  # rows per Parquet row group: lets Spark split 100k rows 64 ways


# ---------------------------------------------------------------- data


def make_synthetic(path: Path, n: int, d: int, files: int, seed: int = 0) -> Dict[str, Any]:
    """Write a features Parquet of ``n`` low-rank-plus-noise rows (stage 1's schema).

    ``X = Z B + mu + 0.1 E`` with ``Z`` (n, 24) and ``E`` standard normal, ``B`` rows
    of decaying scale, ``mu`` uniform in [0, 2) (features are non-negative-ish, as
    MobileNetV2's are): float32, ``error`` null, ``files`` files, 1024-row groups.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"n": n, "d": d, "files": files, "seed": seed, "rank": RANK}
    stamp = path / "_bench.json"
    # The marker Spark's committer leaves last: reduce refuses features without one.
    success = path / "_SUCCESS"
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        success.touch()
        return meta
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    B = (rng.standard_normal((RANK, d)) * (0.8 ** np.arange(RANK))[:, None] * 3).astype(np.float32)
    mu = rng.uniform(0.0, 2.0, d).astype(np.float32)
    schema = pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("features", pa.list_(pa.field("element", pa.float32(), nullable=False))),
            pa.field("error", pa.string()),
        ]
    )
    start = 0
    for i in range(files):
        rows = n // files + (1 if i < n % files else 0)
        Z = rng.standard_normal((rows, RANK), dtype=np.float32)
        X = Z @ B + mu + 0.1 * rng.standard_normal((rows, d), dtype=np.float32)
        ids = range(start, start + rows)
        feats = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (rows + 1) * d, d, dtype=np.int32)), pa.array(X.reshape(-1))
        ).cast(schema.field("features").type)
        tbl = pa.table(
            {
                "path": pa.array([f"file:/synthetic/class{j % 25}/img{j}.jpg" for j in ids]),
                "label": pa.array([f"class{j % 25}" for j in ids]),
                "features": feats,
                "error": pa.nulls(rows, pa.string()),
            },
            schema=schema,
        )
        pq.write_table(tbl, path / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP)
        start += rows
    stamp.write_text(json.dumps(meta))
    success.touch()
    return meta


def dir_bytes(path: Path) -> int:
    """Bytes of the Parquet files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


# ---------------------------------------------------------------- numpy (subprocess)


def numpy_once(features: str, out: Path, k: int) -> Dict[str, Any]:
    """Single-process reference: read, float64, one GEMM, eigh, project, write."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import scipy.linalg

    t0 = time.perf_counter()
    tbl = pq.read_table(features, columns=["path", "label", "features", "error"])
    tbl = tbl.filter(pc.and_(pc.is_null(tbl["error"]), pc.is_valid(tbl["features"])))
    feats = tbl["features"].combine_chunks()
    n = len(feats)
    d = len(feats.flatten()) // n
    X = feats.flatten().to_numpy(zero_copy_only=False).reshape(n, d).astype(np.float64)
    t1 = time.perf_counter()
    mean = X.mean(axis=0)
    X -= mean
    cov = X.T @ X
    cov /= n - 1
    t2 = time.perf_counter()
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    inv = np.zeros_like(std)
    inv[std > 0] = 1.0 / std[std > 0]
    corr = cov * np.outer(inv, inv)
    w, V = scipy.linalg.eigh((corr + corr.T) / 2.0)
    w, V = w[::-1], V[:, ::-1]
    t3 = time.perf_counter()
    Z = X @ (V[:, :k] * inv[:, None])
    t4 = time.perf_counter()
    pca = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)), pa.array(Z.reshape(-1))
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pq.write_table(
        pa.table({"path": tbl["path"], "label": tbl["label"], "pca": pca}), out / "part-0.parquet"
    )
    t5 = time.perf_counter()
    return {
        "seconds": t5 - t0,
        "read_s": t1 - t0,
        "mean_cov_s": t2 - t1,
        "eigh_s": t3 - t2,
        "project_s": t4 - t3,
        "write_s": t5 - t4,
        "rows": n,
        "explained_variance_ratio": (w[:k] / np.trace(corr)).tolist(),
    }


def worker_numpy(args) -> Dict[str, Any]:
    """``--_worker numpy``: ``repeats`` passes, each timed on its own."""
    runs = [
        numpy_once(args.features, Path(args.workdir) / "numpy-out", args.k)
        for _ in range(args.repeats)
    ]
    return {"runs": runs, "max_rss_mib": max_rss_mib()}


# ---------------------------------------------------------------- Spark (subprocess)


def _partition_conf(spark, features: str, partitions: Optional[int]) -> int:
    """Ask Spark for ``partitions`` input splits (None: its defaults); return the count."""
    keys = (
        "spark.sql.files.maxPartitionBytes",
        "spark.sql.files.openCostInBytes",
        "spark.sql.files.minPartitionNum",
    )
    for key in keys:
        spark.conf.unset(key)
    if partitions:
        total = dir_bytes(Path(features))
        spark.conf.set(keys[0], str(max(1, math.ceil(total / partitions))))
        spark.conf.set(keys[1], "0")
        spark.conf.set(keys[2], str(partitions))
    return spark.read.parquet(features).rdd.getNumPartitions()


def _measure(fn, args) -> Dict[str, Any]:
    quiet = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else {}
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    machine = sampler.machine_busy_seconds()
    return {
        **out,
        "seconds": wall,
        "memory": sampler.result(),
        "cpu_s": sampler.cpu_seconds(),
        "others_share": machine["others_cpu_s"] / machine["capacity_cpu_s"],
        "quiet": quiet,
    }


def run_ours(spark, features: str, results: str, k: int) -> Dict[str, Any]:
    """Our reduce, as the CLI runs it, without the search index (Spark ML's side builds none)."""
    from stages.reduce import reduce_features

    summary = reduce_features(
        spark, features, results, k=k, variance=None, overwrite=True, index=False
    )
    return {
        "timings_s": summary["timings_s"],
        "rows": summary["rows"],
        "explained_variance_ratio": summary["explained_variance_ratio"],
    }


def run_spark_ml(spark, features: str, out: str, k: int) -> Dict[str, Any]:
    """Spark ML StandardScaler + PCA: fit, transform, write Parquet (vectors cached)."""
    from pyspark import StorageLevel
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    t0 = time.perf_counter()
    rows = (
        spark.read.parquet(features)
        .where(F.col("error").isNull() & F.col("features").isNotNull())
        .select("path", "label", array_to_vector("features").alias("x"))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        scaler = StandardScaler(withMean=True, withStd=True, inputCol="x", outputCol="z").fit(rows)
        t1 = time.perf_counter()
        scaled = scaler.transform(rows)
        pca = PCA(k=k, inputCol="z", outputCol="p").fit(scaled)
        t2 = time.perf_counter()
        (
            pca.transform(scaled)
            .select("path", "label", vector_to_array("p").alias("pca"))
            .write.mode("overwrite")
            .parquet(out)
        )
        t3 = time.perf_counter()
    finally:
        rows.unpersist()
    return {
        "timings_s": {
            "scaler_fit_incl_read_and_cache": t1 - t0,
            "pca_fit": t2 - t1,
            "transform_and_write": t3 - t2,
        },
        "explained_variance_ratio": pca.explainedVariance.toArray().tolist(),
    }


def worker_spark(args) -> None:
    """``--_worker spark``: one data set, one session; emits a JSON line per result so
    a timeout (Spark ML at d = 4096) keeps what was measured before it."""
    from stages.base.session import spark_session

    work = Path(args.workdir) / f"spark-{os.getpid()}"
    t0 = time.perf_counter()
    conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}
    if args.driver_memory:
        conf["spark.driver.memory"] = args.driver_memory
    spark = spark_session("reduce-bench", master=args.master, conf=conf)
    spark.range(1).count()
    emit({"session_start_s": time.perf_counter() - t0, "code": code_version()})
    features = args.features
    parts = _partition_conf(spark, features, args.partitions)
    emit({"partitions": parts, "master": args.master})
    for r in range(args.repeats):
        res = _measure(lambda: run_ours(spark, features, str(work / "ours"), args.k), args)
        emit({f"ours_{r}": res})
    if args.numpy:
        quiet = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else {}
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_worker",
            "numpy",
            "--features",
            features,
            "--k",
            str(args.k),
            "--repeats",
            str(args.repeats),
            "--workdir",
            str(work),
        ]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_MARK)]
        if lines:
            res = json.loads(lines[-1][len(JSON_MARK) :])
            res["quiet"] = quiet
            emit({"numpy": res})
    for r in range(args.ml_repeats):
        res = _measure(lambda: run_spark_ml(spark, features, str(work / "ml"), args.k), args)
        emit({f"spark_ml_{r}": res})
    for p in args.sweep or []:
        actual = _partition_conf(spark, features, p)
        res = _measure(lambda: run_ours(spark, features, str(work / "ours"), args.k), args)
        res["partitions"] = actual
        emit({f"sweep_{p}": res})
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)


def worker_featurize(args) -> Dict[str, Any]:
    """``--_worker featurize``: the real features (bundled alpha-0.35 weights), in a
    session of their own so that no TensorFlow worker lingers in the measured ones."""
    from stages.base.session import spark_session
    from stages.featurize import featurize

    spark = spark_session(
        "reduce-bench-featurize",
        master=args.master,
        conf={"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"},
    )
    report = featurize(spark, args.featurize_from, args.features, weights="bundled", overwrite=True)
    spark.stop()
    return report.to_dict()


# ---------------------------------------------------------------- parent


def run_spark_worker(
    args, dataset: Dict[str, Any], extra: Sequence[str], timeout: Optional[float]
) -> Dict[str, Any]:
    """Run one data set's Spark worker; merge its JSON lines (partial on timeout)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        "spark",
        "--features",
        dataset["path"],
        "--k",
        str(dataset["k"]),
        "--workdir",
        args.workdir,
        "--quiet-wait",
        str(args.quiet_wait),
        *extra,
    ]
    env = dict(os.environ)
    paths = [env.get("FRUITS_BENCH_CODE", ""), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    log = Path(args.workdir) / f"log-{dataset['name']}-{len(extra)}.txt"
    timed_out = False
    with open(log, "w") as err:
        try:
            proc = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=timeout,
                env=env,
                cwd=args.workdir,  # not ROOT: a worker imports stages/ from its cwd first
            )
            out = proc.stdout
        except subprocess.TimeoutExpired as exc:
            timed_out = True
            raw = exc.stdout or b""
            out = raw.decode() if isinstance(raw, bytes) else raw
    merged: Dict[str, Any] = {"timed_out": timed_out, "timeout_s": timeout}
    for line in out.splitlines():
        if line.startswith(JSON_MARK):
            merged.update(json.loads(line[len(JSON_MARK) :]))
    if "session_start_s" not in merged:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"reduce worker for {dataset['name']} failed:\n{tail}")
    return merged


def _best(res: Dict[str, Any], prefix: str) -> Optional[Dict[str, Any]]:
    runs = [v for k, v in res.items() if k.startswith(prefix)]
    return min(runs, key=lambda r: r["seconds"]) if runs else None


def _evr_err(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> Optional[float]:
    if not a or not b:
        return None
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    m = min(len(x), len(y))
    return float(np.max(np.abs(x[:m] - y[:m]) / np.maximum(np.abs(y[:m]), 1e-300)))


def summarise(ds: Dict[str, Any], res: Dict[str, Any]) -> Dict[str, Any]:
    """One row: times, ratios, memory, agreement."""
    ours = _best(res, "ours_")
    ml = _best(res, "spark_ml_")
    npy = min(res["numpy"]["runs"], key=lambda r: r["seconds"]) if "numpy" in res else None
    row: Dict[str, Any] = {
        "name": ds["name"],
        "n": ours["rows"] if ours else ds.get("n"),
        "d": ds["d"],
        "k": ds["k"],
        "partitions": res.get("partitions"),
        "master": res.get("master"),
        "ours_s": ours["seconds"] if ours else None,
        "ours_timings_s": ours["timings_s"] if ours else None,
        "ours_repeats_s": [v["seconds"] for k, v in res.items() if k.startswith("ours_")],
        "spark_ml_s": ml["seconds"] if ml else None,
        "spark_ml_timings_s": ml["timings_s"] if ml else None,
        "numpy_s": npy["seconds"] if npy else None,
        "numpy_timings_s": npy,
        "spark_ml_timed_out": bool(res.get("timed_out") and ml is None and ds.get("ml")),
        "timeout_s": res.get("timeout_s"),
        "note": ds.get("note", ""),
    }
    if ours:
        row["ml_over_ours"] = row["spark_ml_s"] / ours["seconds"] if ml else None
        if row["spark_ml_timed_out"]:
            row["ml_over_ours_at_least"] = res["timeout_s"] / ours["seconds"]
        row["ours_over_numpy"] = ours["seconds"] / npy["seconds"] if npy else None
        row["memory"] = ours["memory"]
        row["ours_others_share"] = ours["others_share"]
        row["evr_rel_err_vs_numpy"] = _evr_err(
            ours["explained_variance_ratio"], npy and npy["explained_variance_ratio"]
        )
        row["evr_rel_err_vs_spark_ml"] = _evr_err(
            ours["explained_variance_ratio"], ml and ml["explained_variance_ratio"]
        )
    row["ml_memory"] = ml["memory"] if ml else None
    row["numpy_peak_mib"] = res["numpy"]["max_rss_mib"] if "numpy" in res else None
    row["sweep"] = [
        {"requested": int(k.split("_")[1]), **v} for k, v in res.items() if k.startswith("sweep_")
    ]
    return row


def _ratio_cell(r: Dict[str, Any]) -> Any:
    if r.get("ml_over_ours") is not None:
        return r["ml_over_ours"]
    if r.get("ml_over_ours_at_least") is not None:
        return f">= {r['ml_over_ours_at_least']:.1f}"
    return None


def _spark_ml_cell(r: Dict[str, Any]) -> Any:
    if r["spark_ml_s"] is not None:
        return r["spark_ml_s"]
    return f"> {r['timeout_s']:.0f} (timeout)" if r["spark_ml_timed_out"] else "-"


# One row per data set (``summarise``).
MAIN_COLS = [
    Col("data", "name"),
    Col("n", "n"),
    Col("d", "d"),
    Col("k", "k"),
    Col("P", "partitions"),
    Col("ours s", "ours_s"),
    Col("Spark ML s", _spark_ml_cell),
    Col("numpy s", "numpy_s"),
    Col("ML / ours (>= 5)", _ratio_cell),
    Col("ours / numpy (<= 1.3)", "ours_over_numpy"),
    Col(
        "EVR rel err vs numpy / ML",
        lambda r: f"{sci(r.get('evr_rel_err_vs_numpy'))} / {sci(r.get('evr_rel_err_vs_spark_ml'))}",
    ),
    Col("others' CPU", lambda r: pct(r.get("ours_others_share", 0))),
]
ML_PHASES = ("scaler_fit_incl_read_and_cache", "pca_fit", "transform_and_write")
ML_PHASE_HEADERS = ("ML: scaler fit (read+cache)", "PCA fit", "transform+write")
NUMPY_PHASES = ("read_s", "mean_cov_s", "eigh_s", "project_s", "write_s")
NUMPY_PHASE_HEADERS = ("numpy: read", "mean+cov", "eigh", "project", "write")
MEMORY_COLS = [
    Col("data", "name"),
    Col("n x d", lambda r: f"{r['n']} x {r['d']}"),
    Col("ours: driver Python MiB", "memory.driver_python_peak_mib"),
    Col("driver JVM MiB", "memory.jvm_peak_mib"),
    Col("Python workers MiB", "memory.workers_sum_peak_mib"),
    Col("ML: driver JVM MiB", "ml_memory.jvm_peak_mib"),
    Col("numpy process MiB", "numpy_peak_mib"),
]
SCALING_COLS = [
    Col("n", "n"),
    Col("ours s", "ours_s"),
    Col("ours ms / 1k rows", lambda r: 1e6 * r["ours_s"] / r["n"]),
    Col("Spark ML s", "spark_ml_s"),
    Col("numpy s", "numpy_s"),
    Col("ML / ours", "ml_over_ours"),
    Col("ours / numpy", "ours_over_numpy"),
]
# One row per (data set, partition count): the sweep record with its data set's row.
SWEEP_COLS = [
    Col("data", "row.name"),
    Col("P requested", "requested"),
    Col("P actual", "partitions"),
    Col("ours s", "seconds"),
    Col(
        "ours / numpy",
        lambda s: s["seconds"] / s["row"]["numpy_s"] if s["row"]["numpy_s"] else None,
    ),
    Col("driver JVM MiB", "memory.jvm_peak_mib"),
    Col("workers MiB", "memory.workers_sum_peak_mib"),
]
LOCAL_CLUSTER_COLS = [
    Col("n x d", lambda m: f"{m['n']} x {m['d']}"),
    Col("ours s", "seconds"),
    Col("driver Python MiB", "memory.driver_python_peak_mib"),
    Col("driver JVM MiB", "memory.jvm_peak_mib"),
    Col("executor JVM MiB (max)", "memory.executor_jvm_peak_mib"),
    Col("Python workers MiB (sum)", "memory.workers_sum_peak_mib"),
]


def print_tables(rows: List[Dict[str, Any]], memory_rows: List[Dict[str, Any]]) -> List[str]:
    """Print and return the tables."""
    out = [records_table(MAIN_COLS, rows)]
    # The reduce's own phase names (summary.json timings_s) change with its code.
    ours_keys: List[str] = []
    for r in rows:
        for key in r["ours_timings_s"] or {}:
            if key != "reduce_total" and key not in ours_keys:
                ours_keys.append(key)
    phase_cols = [
        Col("data", "name"),
        *(Col(f"ours: {k}", f"ours_timings_s.{k}") for k in ours_keys),
        *(Col(h, f"spark_ml_timings_s.{k}") for h, k in zip(ML_PHASE_HEADERS, ML_PHASES)),
        *(Col(h, f"numpy_timings_s.{k}") for h, k in zip(NUMPY_PHASE_HEADERS, NUMPY_PHASES)),
    ]
    out.append(records_table(phase_cols, rows))
    out.append(records_table(MEMORY_COLS, rows, digits=0))
    scaling = [r for r in rows if r["name"].startswith("synthetic") and r["d"] == 1280]
    if len(scaling) >= 2:
        fit = linear_fit([r["n"] for r in scaling], [r["ours_s"] for r in scaling])
        out.append(
            records_table(SCALING_COLS, sorted(scaling, key=lambda r: r["n"]))
            + f"\nours: t = {fit['a']:.2f} s + {fit['b_ms_per_1k']:.2f} ms per 1k rows"
            f" (R^2 {fit['r2']:.4f}); log-log slope between the two largest n: {fit['slope']:.2f}"
        )
    sweeps = [{**s, "row": r} for r in rows for s in r["sweep"]]
    if sweeps:
        out.append(records_table(SWEEP_COLS, sweeps))
    if memory_rows:
        out.append(
            records_table(
                LOCAL_CLUSTER_COLS,
                memory_rows,
                digits=0,
                title="ours under local-cluster[2,1,MB] (driver and executors in separate JVMs)",
            )
        )
    show_tables(out)
    return out


def linear_fit(ns: Sequence[int], ts: Sequence[float]) -> Dict[str, float]:
    """Least squares ``t = a + b n`` and the log-log slope of the two largest points."""
    import numpy as np

    n = np.asarray(ns, dtype=float)
    t = np.asarray(ts, dtype=float)
    A = np.stack([np.ones_like(n), n], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, t, rcond=None)
    pred = A @ np.array([a, b])
    ss = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum((t - pred) ** 2)) / ss if ss > 0 else 1.0
    order = np.argsort(n)
    i, j = order[-2], order[-1]
    slope = float(np.log(t[j] / t[i]) / np.log(n[j] / n[i]))
    return {"a": float(a), "b_ms_per_1k": float(b) * 1e6, "r2": r2, "slope": slope}


def plot(rows: List[Dict[str, Any]], memory_rows: List[Dict[str, Any]], path: Path) -> None:
    """Time against n (three methods), ratios, partition sweep, driver memory."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    scaling = sorted(
        [r for r in rows if r["name"].startswith("synthetic") and r["d"] == 1280],
        key=lambda r: r["n"],
    )
    ax = axes[0][0]
    for key, label in (("ours_s", "ours"), ("spark_ml_s", "Spark ML"), ("numpy_s", "numpy")):
        pts = [(r["n"], r[key]) for r in scaling if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows n (d = 1280)")
    ax.set_ylabel("fit + transform + write, s")
    ax.legend()
    ax.set_title("time against n")
    ax = axes[0][1]
    for key, label, goal in (
        ("ml_over_ours", "Spark ML / ours", 5.0),
        ("ours_over_numpy", "ours / numpy", 1.3),
    ):
        pts = [(r["n"], r[key]) for r in scaling if r.get(key)]
        if pts:
            line = ax.plot(*zip(*pts), "o-", label=label)[0]
            ax.axhline(goal, color=line.get_color(), ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("rows n")
    ax.set_ylabel("ratio (dashed: goals)")
    ax.legend()
    ax.set_title("ratios")
    ax = axes[1][0]
    for r in rows:
        if r["sweep"]:
            ax.plot(
                [s["partitions"] for s in r["sweep"]],
                [s["seconds"] for s in r["sweep"]],
                "o-",
                label=r["name"],
            )
            if r["numpy_s"]:
                ax.axhline(r["numpy_s"], color="gray", ls=":", lw=1, label="numpy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("partitions")
    ax.set_ylabel("ours, s")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title("partition sweep" if any(r["sweep"] for r in rows) else "no partition sweep run")
    ax = axes[1][1]
    src = memory_rows or [dict(r, seconds=r["ours_s"]) for r in scaling if r.get("memory")]
    if src:
        ns = [m["n"] for m in src]
        ax.plot(
            ns, [m["memory"]["driver_python_peak_mib"] for m in src], "o-", label="driver Python"
        )
        ax.plot(ns, [m["memory"]["jvm_peak_mib"] for m in src], "o-", label="driver JVM")
        if memory_rows:
            ax.plot(
                ns, [m["memory"]["executor_jvm_peak_mib"] for m in src], "o-", label="executor JVM"
            )
        ax.plot(
            ns, [m["memory"]["workers_sum_peak_mib"] for m in src], "o-", label="Python workers"
        )
        ax.set_xscale("log")
        ax.set_xlabel("rows n")
        ax.set_ylabel("peak RSS, MiB")
        ax.legend()
        ax.set_title("memory of ours against n")
    save_figure(fig, path)


def plan(args) -> List[Dict[str, Any]]:
    """The data sets of this run."""
    data = Path(args.workdir) / "data"
    sets: List[Dict[str, Any]] = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for n in sizes:
        sets.append(
            {
                "name": f"synthetic {n // 1000}k",
                "n": n,
                "d": 1280,
                "k": args.k,
                "ml": True,
                "numpy": True,
            }
        )
    for spec in [s for s in args.wide.split(",") if s]:
        n, d = (int(x) for x in spec.split("x"))
        sets.append(
            {
                "name": f"synthetic {n // 1000}k x {d}",
                "n": n,
                "d": d,
                "k": args.k,
                "ml": True,
                "numpy": True,
            }
        )
    for s in sets:
        s["path"] = str(data / f"features-{s['n']}x{s['d']}")
        s["files"] = 8 if s["n"] >= 50_000 else 4
    if args.real:
        images = args.real_images or str(SAMPLE_IMAGES if args.quick else SHARED_IMAGES)
        name = Path(images).name
        sets.append(
            {
                "name": f"real ({'sample' if args.quick else 'shared'} {name})",
                "images": images,
                "path": str(data / f"real-{hashlib.sha1(images.encode()).hexdigest()[:10]}"),
                "d": 1280,
                "k": min(args.k, 50),
                "ml": True,
                "numpy": True,
            }
        )
    return sets


def parent(args) -> int:
    """Generate the data, run each data set's worker, print, save, plot."""
    import psutil

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    sets = plan(args)
    print(
        f"reduce bench: {len(sets)} data sets, k={args.k}, master {args.master}; "
        f"load {info['loadavg_1_5_15']}"
    )
    rows: List[Dict[str, Any]] = []
    raw: Dict[str, Any] = {}
    notes: List[str] = []
    numpy_mib_per_row: Optional[float] = None
    for ds in sets:
        n = ds.get("n")
        if n and numpy_mib_per_row and n > 100_000:
            # Measured, not guessed: numpy's peak per row at the largest size run so far.
            need = numpy_mib_per_row * n
            avail = psutil.virtual_memory().available / MIB
            if need > 0.6 * avail:
                ds["numpy"] = ds["ml"] = False
                note = (
                    f"{ds['name']}: numpy would need ~{need / 1024:.1f} GiB (measured "
                    f"{numpy_mib_per_row * 1e3:.2f} MiB per 1k rows) of {avail / 1024:.1f} GiB "
                    "available: numpy and Spark ML skipped, ours only"
                )
                ds["note"] = note
                notes.append(note)
                print("  " + note)
        if n:
            t0 = time.perf_counter()
            make_synthetic(Path(ds["path"]), n, ds["d"], ds["files"])
            print(f"  {ds['name']}: data ready in {time.perf_counter() - t0:.1f} s", flush=True)
        repeats = args.repeats if ds["numpy"] else 1  # ours-only sets are the big ones
        extra = ["--master", args.master, "--repeats", str(repeats)]
        extra += ["--ml-repeats", str(args.ml_repeats if ds["ml"] else 0)]
        if ds["numpy"]:
            extra.append("--numpy")
        if args.driver_memory:
            extra += ["--driver-memory", args.driver_memory]
        if "images" in ds and not (Path(ds["path"]) / "_SUCCESS").exists():
            t0 = time.perf_counter()
            run_worker(
                Path(__file__).resolve(),
                [
                    "--_worker",
                    "featurize",
                    "--featurize-from",
                    ds["images"],
                    "--features",
                    ds["path"],
                ],
                work / "log-featurize.txt",
            )
            print(f"  {ds['name']}: featurized in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.sweep and n == args.sweep_n and ds["d"] == 1280:
            extra += ["--sweep", args.sweep]
        print(f"  {ds['name']}: ours / numpy / Spark ML ...", flush=True)
        res = run_spark_worker(args, ds, extra, timeout=args.timeout)
        raw[ds["name"]] = res
        row = summarise(ds, res)
        rows.append(row)
        if row["numpy_peak_mib"] and row["n"]:
            numpy_mib_per_row = row["numpy_peak_mib"] / row["n"]
        print(
            f"    ours {row['ours_s']:.2f} s, Spark ML {row['spark_ml_s'] or float('nan'):.2f} s, "
            f"numpy {row['numpy_s'] or float('nan'):.2f} s",
            flush=True,
        )
    memory_rows: List[Dict[str, Any]] = []
    if args.memory_master:
        for ds in [s for s in sets if s.get("n") and s["d"] == 1280]:
            print(f"  memory: {ds['name']} under {args.memory_master} ...", flush=True)
            extra = ["--master", args.memory_master, "--repeats", "1", "--ml-repeats", "0"]
            res = run_spark_worker(args, ds, extra, timeout=args.timeout)
            ours = _best(res, "ours_")
            if ours:
                memory_rows.append({"n": ours["rows"], "d": ds["d"], **ours})
    info["loadavg_end"] = list(os.getloadavg())
    print()
    tables = print_tables(rows, memory_rows)
    for note in notes:
        print("note: " + note)
    stem = args.stem or ("reduce_quick" if args.quick else "reduce")
    goals = {
        "ml_over_ours_min": 5.0,
        "ours_over_numpy_max_issue4": 1.3,
        "ours_over_numpy_max_issue6": 1.5,
    }
    data = {
        "benchmark": "reduce",
        "command": " ".join(["python", "benchmarks/reduce_bench.py", *sys.argv[1:]]),
        "machine": info,
        "goals": goals,
        "rows": rows,
        "memory_rows": memory_rows,
        "notes": notes,
        "raw": raw,
    }
    path = write_results(stem, data, tables)
    plot(rows, memory_rows, RESULTS_DIR / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def render(path: Path) -> int:
    """Reprint the tables (and redraw the PNG) of a saved run, e.g. after a table change."""
    data = json.loads(path.read_text())
    tables = print_tables(data["rows"], data.get("memory_rows", []))
    for note in data.get("notes", []):
        print("note: " + note)
    write_results(path.stem, {k: v for k, v in data.items() if k != "tables"}, tables)
    plot(data["rows"], data.get("memory_rows", []), path.with_suffix(".png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="20k x 1280 + the 100-image sample (~2 min)"
    )
    p.add_argument(
        "--sizes", default=None, help="rows of the d=1280 sets (default 10000,30000,100000)"
    )
    p.add_argument("--wide", default=None, help="NxD sets (default 10000x4096; quick none)")
    p.add_argument("--k", type=int, default=50, help="components (the real set uses min(k, 50))")
    p.add_argument("--no-real", dest="real", action="store_false", help="skip the real features")
    p.add_argument("--real-images", default=None, help="images to featurize for the real set")
    p.add_argument("--master", default="local[2]")
    p.add_argument(
        "--memory-master",
        default=None,
        help="also run ours under this master, for memory (default local-cluster[2,1,3072];"
        " quick none)",
    )
    p.add_argument(
        "--driver-memory", default=None, help="spark.driver.memory (default: session's 4g)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="ours and numpy runs, best kept (2; quick 1)"
    )
    p.add_argument("--ml-repeats", type=int, default=1, help="Spark ML runs, best kept")
    p.add_argument(
        "--sweep",
        default=None,
        help="partitions for ours at the largest n (default 2,4,8,16,32,64)",
    )
    p.add_argument("--sweep-n", type=int, default=100_000, help="rows of the set swept")
    p.add_argument("--timeout", type=float, default=600, help="s per data set (Spark ML at d=4096)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="wait up to s for a quiet machine (20; quick 0)",
    )
    p.add_argument(
        "--code", default=None, help="a folder with a patched copy of stages/ to measure"
    )
    p.add_argument("--workdir", default="/tmp/fruits-bench-reduce")
    p.add_argument("--stem", default=None, help="results/<stem>.json|png")
    p.add_argument("--render", default=None, help="reprint tables and PNG from a results JSON")
    # Worker-only options.
    p.add_argument(
        "--_worker", choices=["spark", "numpy", "featurize"], default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--features", default=None, help=argparse.SUPPRESS)
    p.add_argument("--numpy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--featurize-from", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point (parent or ``--_worker``)."""
    quiet_env()
    args = build_parser().parse_args(argv)
    if args._worker:
        args.repeats = args.repeats or 1
        args.quiet_wait = args.quiet_wait or 0.0
        args.sweep = [int(x) for x in args.sweep.split(",")] if args.sweep else []
        if args._worker == "numpy":
            emit(worker_numpy(args))
        elif args._worker == "featurize":
            emit(worker_featurize(args))
        else:
            worker_spark(args)
        return 0
    # Workers run in the work folder (so that a --code copy wins over ./stages): absolute paths.
    args.workdir = str(Path(args.workdir).resolve())
    if args.real_images:
        args.real_images = str(Path(args.real_images).resolve())
    if args.code:
        os.environ["FRUITS_BENCH_CODE"] = str(Path(args.code).resolve())
    if args.render:
        return render(Path(args.render))
    if args.sizes is None:
        args.sizes = "20000" if args.quick else "10000,30000,100000"
    if args.wide is None:
        args.wide = "" if args.quick else "10000x4096"
    if args.memory_master is None:
        args.memory_master = "" if args.quick else "local-cluster[2,1,3072]"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.sweep is None:
        args.sweep = "" if args.quick else "2,4,8,16,32,64"
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 20.0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
