"""Helpers shared by the benchmark scripts: memory sampling, subprocess workers, output.

Every script runs its configurations in subprocesses of itself (``--_worker ...``), each
printing one JSON line prefixed with :data:`JSON_MARK`, so that Spark sessions with
different masters never share a JVM and a worker's memory is its own.  Tables and
figures: :mod:`benchmarks._table`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
JSON_MARK = "BENCH_JSON:"
MIB = 1024 * 1024


def quiet_env() -> None:
    """Less TensorFlow and Spark chatter, no Spark UI (set before either starts)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("FRUITS_SPARK_UI", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def emit(result: Dict[str, Any]) -> None:
    """Print a worker's result as the one JSON line the parent reads."""
    print(JSON_MARK + json.dumps(result), flush=True)


def run_worker(
    script: Path, args: Sequence[str], log_path: Path, timeout: Optional[float] = None
) -> Dict[str, Any]:
    """Run ``python script --_worker ...`` and return the JSON it emitted.

    The worker's stdout and stderr go to ``log_path``; on failure its tail is shown.
    """
    cmd = [sys.executable, str(script), *args]
    env = dict(os.environ)
    # Spark's Python workers inherit PYTHONPATH: a patched copy of stages/ (--code) first.
    paths = [env.get("FRUITS_BENCH_CODE", ""), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=timeout,
            env=env,
            cwd=log_path.parent,
        )
    out = proc.stdout
    with open(log_path, "a") as log:
        log.write("\n--- stdout ---\n" + out)
    for line in reversed(out.splitlines()):
        if line.startswith(JSON_MARK):
            return json.loads(line[len(JSON_MARK) :])
    tail = log_path.read_text()[-4000:]
    raise RuntimeError(f"worker {' '.join(args)} failed (rc={proc.returncode}):\n{tail}")


class RssSampler:
    """Peak resident memory of this process tree, sampled in a thread.

    Classifies the descendants of this process: the Spark driver JVM (``java``; in
    ``local[N]`` mode it is the executor too), executor JVMs (``local-cluster``), PySpark
    Python workers (forked by ``pyspark.daemon``; the daemon itself is left out)
    and this driver's Python process.  RSS counts pages shared with the daemon
    after fork, so a worker's RSS overstates what it alone adds.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self._me = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reset()

    def reset(self) -> None:
        """Forget the peaks seen so far."""
        self.peak_driver = 0
        self.peak_jvm = 0
        self.peak_executor_jvm = 0
        self.peak_executor_jvms_sum = 0
        self.peak_worker = 0
        self.peak_workers_sum = 0
        self.workers_seen: set = set()
        # pid -> [class, cpu seconds at first sight, cpu seconds at last sight]
        self._cpu: Dict[int, List[Any]] = {}
        self._first_sample = True

    def _is_worker(self, proc) -> bool:
        try:
            cmd = " ".join(proc.cmdline())
            if "pyspark.daemon" not in cmd and "pyspark/daemon.py" not in cmd:
                return False
            parent = proc.parent()
            if parent is None:
                return False
            # The daemon's parent is the JVM (whose class path names pyspark too): left out.
            up = " ".join(parent.cmdline())
            return "pyspark.daemon" in up or "pyspark/daemon.py" in up
        except (self._psutil.Error, OSError):
            return False

    def _track_cpu(self, proc, kind: str) -> None:
        try:
            t = proc.cpu_times()
        except (self._psutil.Error, OSError):
            return
        used = t.user + t.system
        entry = self._cpu.get(proc.pid)
        if entry is None:
            # Seen at the start: count from now; born later: count from its birth.
            self._cpu[proc.pid] = [kind, used if self._first_sample else 0.0, used]
        else:
            # spark-submit's bash becomes the JVM by exec: a known kind replaces "other"
            # (and stays: an orphaned worker is still a worker).
            if kind != "other":
                entry[0] = kind
            entry[2] = used

    def sample(self) -> None:
        """Take one sample now."""
        ps = self._psutil
        try:
            self.peak_driver = max(self.peak_driver, self._me.memory_info().rss)
            self._track_cpu(self._me, "driver python")
            children = self._me.children(recursive=True)
        except (ps.Error, OSError):
            return
        workers_sum = executors_sum = 0
        for child in children:
            try:
                rss = child.memory_info().rss
                if child.name().startswith("java"):
                    if "CoarseGrainedExecutorBackend" in " ".join(child.cmdline()):
                        # local-cluster / standalone: an executor JVM of its own
                        executors_sum += rss
                        self.peak_executor_jvm = max(self.peak_executor_jvm, rss)
                        self._track_cpu(child, "executor jvms")
                    else:
                        self.peak_jvm = max(self.peak_jvm, rss)
                        self._track_cpu(child, "jvm")
                elif self._is_worker(child):
                    workers_sum += rss
                    self.peak_worker = max(self.peak_worker, rss)
                    self.workers_seen.add(child.pid)
                    self._track_cpu(child, "python workers")
                else:
                    self._track_cpu(child, "other")
            except (ps.Error, OSError):
                continue
        self.peak_workers_sum = max(self.peak_workers_sum, workers_sum)
        self.peak_executor_jvms_sum = max(self.peak_executor_jvms_sum, executors_sum)
        self._first_sample = False

    def cpu_seconds(self) -> Dict[str, float]:
        """CPU seconds (user + system) used in the sampled window, by process kind."""
        out: Dict[str, float] = {}
        for kind, first, last in self._cpu.values():
            out[kind] = out.get(kind, 0.0) + max(0.0, last - first)
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._stop.clear()
        self._sys0 = self._psutil.cpu_times()
        self._t0 = time.perf_counter()
        self.sample()  # CPU baselines of the processes alive at the start
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self._sys1 = self._psutil.cpu_times()
        self._t1 = time.perf_counter()

    def machine_busy_seconds(self) -> Dict[str, float]:
        """CPU seconds the whole machine spent busy in the window, ours and others'.

        ``others`` (busy minus this process tree) shows how much of the shared
        machine other people's jobs took while we measured.
        """
        a, b = self._sys0, self._sys1
        idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
        total = sum(b) - sum(a)
        ours = sum(self.cpu_seconds().values())
        wall = self._t1 - self._t0
        busy = total - idle
        return {
            "wall_s": wall,
            "capacity_cpu_s": wall * (os.cpu_count() or 1),
            "busy_cpu_s": busy,
            "ours_cpu_s": ours,
            "others_cpu_s": max(0.0, busy - ours),
        }

    def result(self) -> Dict[str, float]:
        """Peaks in MiB."""
        return {
            "driver_python_peak_mib": self.peak_driver / MIB,
            "jvm_peak_mib": self.peak_jvm / MIB,
            "executor_jvm_peak_mib": self.peak_executor_jvm / MIB,
            "executor_jvms_sum_peak_mib": self.peak_executor_jvms_sum / MIB,
            "worker_peak_mib": self.peak_worker / MIB,
            "workers_sum_peak_mib": self.peak_workers_sum / MIB,
            "workers_seen": len(self.workers_seen),
        }


def others_busy_fraction(interval: float = 1.0) -> float:
    """Share of the machine's CPU that processes outside this tree used over ``interval`` s."""
    import psutil

    me = psutil.Process(os.getpid())

    def ours() -> float:
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.Error, OSError):
                pass
        return total

    s0, o0 = psutil.cpu_times(), ours()
    time.sleep(interval)
    s1, o1 = psutil.cpu_times(), ours()
    idle = (s1.idle - s0.idle) + (getattr(s1, "iowait", 0.0) - getattr(s0, "iowait", 0.0))
    busy = (sum(s1) - sum(s0)) - idle - (o1 - o0)
    return max(0.0, busy / (interval * (os.cpu_count() or 1)))


def wait_quiet(max_wait: float, threshold: float = 0.15) -> Dict[str, float]:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` of the CPU.

    This machine is shared: a measurement taken while another job runs says little.
    Returns the seconds waited and the last share seen (recorded with the figures).
    """
    t0 = time.perf_counter()
    share = others_busy_fraction()
    while share > threshold and time.perf_counter() - t0 < max_wait:
        share = others_busy_fraction()
    return {"waited_s": time.perf_counter() - t0, "others_share": share}


def code_version() -> Dict[str, str]:
    """Which copy of the stages ran (a patched copy on PYTHONPATH shows here)."""
    import stages

    return {"stages": str(Path(stages.__file__).resolve().parent)}


def max_rss_mib() -> float:
    """This process's own peak RSS so far (``ru_maxrss``), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info() -> Dict[str, Any]:
    """What ran the benchmark (load average included: this machine is shared)."""
    import numpy
    import pyspark

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyspark": pyspark.__version__,
        "loadavg_1_5_15": list(os.getloadavg()),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(stem: str, data: Dict[str, Any], tables: List[str]) -> Path:
    """Write ``results/<stem>.json`` (with the printed tables) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stem}.json"
    data = dict(data)
    data["tables"] = tables
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (set, Path)):
        return sorted(obj) if isinstance(obj, set) else str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
