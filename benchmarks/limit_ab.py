"""Whole processes, side by side: ``fruits-pipeline featurize`` against the fair limit.

``featurize_bench.py --limit`` runs, for each alpha, the single-process limit
(:mod:`benchmarks.litert_limit`) and ``python -m stages.cli featurize`` on the same
photos in turn (A B A B ...), each a whole process started here: wall seconds, CPU
seconds (the kernel's account of the finished process tree, ``wait4``), the CPU by
process kind (driver, JVM, Python workers; sampled) and the Python workers' peak RSS.
Ratios are taken pair by pair and their medians printed, so they hold while the
shared machine's speed drifts.  The flatbuffer is prepared before the first run
(bundled at alpha 0.35; converted into the driver's cache otherwise), so neither
side converts.  The features of the last pair are compared row by row.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks._common import ROOT, RssSampler
from benchmarks._table import Col, pct, records_table
from benchmarks.litert_limit import model_file, weights_for

LIMIT_SCRIPT = Path(__file__).resolve().parent / "litert_limit.py"


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux): the JVM outlives the driver that started it,
    and only a reaped process's CPU reaches ``RUSAGE_CHILDREN``."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def timed_tree(
    cmd: Sequence[str], log: Path, extra_env: Optional[Dict[str, str]] = None
) -> Dict[str, Any]:
    """Run ``cmd`` and every process it starts to their end.

    Returns wall s, CPU s of the whole tree (the kernel's account of the reaped
    processes, plus the sampled Python workers), CPU by kind (sampled; ``other``:
    the driver's Python, PySpark's daemon, the launchers), the Python workers' peak
    RSS, the share of the machine others used meanwhile.
    """
    import resource

    _become_subreaper()
    env = dict(os.environ)
    paths = [env.get("FRUITS_BENCH_CODE", ""), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra_env or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as fh, RssSampler(interval=0.1) as sampler:
        t0 = time.perf_counter()
        # Started in the log's folder: ``-m stages.cli`` then imports the stages of
        # PYTHONPATH (a --code copy first), not the checkout's by the current folder.
        proc = subprocess.Popen(
            list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent
        )
        rc = proc.wait()
        wall = time.perf_counter() - t0
        while True:  # the adopted orphans (the JVM, its Python workers)
            try:
                os.wait()
            except ChildProcessError:
                break
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={rc}), see {log}")
    machine = sampler.machine_busy_seconds()
    by_kind = sampler.cpu_seconds()
    by_kind.pop("driver python", None)  # this process, not the one measured
    # PySpark's daemon ignores SIGCHLD: its forked workers are reaped by the kernel and
    # their CPU never reaches ours; they are added as sampled (they end idle).
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": reaped + by_kind.get("python workers", 0.0),
        "cpu_by_kind_s": by_kind,
        "worker_peak_mib": sampler.result()["worker_peak_mib"],
        "others_share": machine["others_cpu_s"] / machine["capacity_cpu_s"],
    }


def max_feature_difference(a: str, b: str) -> float:
    """Largest |difference| of the features of the same paths in two outputs."""
    import numpy as np
    import pyarrow.parquet as pq

    def load(folder: str) -> Dict[str, Any]:
        t = pq.read_table(folder, columns=["path", "features"])
        paths = [p.split(":", 1)[-1].lstrip("/") for p in t.column("path").to_pylist()]
        return dict(zip(paths, t.column("features").to_pylist()))

    fa, fb = load(a), load(b)
    worst, compared = 0.0, 0
    for p, v in fa.items():
        w = fb.get(p)
        if v is None or w is None:
            continue
        compared += 1
        worst = max(worst, float(np.max(np.abs(np.asarray(v) - np.asarray(w)))))
    if compared == 0:
        raise RuntimeError(f"no row of {a} has features in {b}: different paths?")
    return worst


def limit_ab(
    images: str,
    alphas: Sequence[float],
    repeats: int,
    work: Path,
    variants: Optional[Dict[str, Dict[str, str]]] = None,
) -> List[Dict]:
    """Per alpha: ``repeats`` rounds of whole processes in turn (the limit, featurize, and
    featurize under each of ``variants``' environments), medians and ratios to the limit
    of the same round; one row per featurize kind and alpha.  One featurize of the
    bundled sample runs first, untimed: it writes the JVM's class archive."""
    py = sys.executable
    kinds = {"featurize": {}, **(variants or {})}
    rows = []
    # Untimed, like the flatbuffer: the first command of a machine writes the local JVM's
    # class archive (stages.base.jvm_archive) at its end; no round should be that one.
    timed_tree(
        [py, "-m", "stages.cli", "featurize", str(ROOT / "sample" / "fruits360")]
        + [str(work / "warm-out"), "--weights", "bundled", "--overwrite", "--quiet"],
        work / "log-warm-up.txt",
    )
    for alpha in alphas:
        model = model_file(alpha)  # prepared, untimed
        rounds: Dict[str, List[Dict[str, Any]]] = {k: [] for k in kinds}
        for r in range(repeats):
            print(f"  limit vs featurize, alpha {alpha}, round {r + 1}/{repeats} ...", flush=True)
            lim = timed_tree(
                [py, str(LIMIT_SCRIPT), images, str(work / "limit-out"), "--model", model],
                work / f"log-limit-{alpha}-{r}.txt",
            )
            for i, (kind, env) in enumerate(kinds.items()):
                cli = timed_tree(
                    [py, "-m", "stages.cli", "featurize", images, str(work / f"cli-out-{i}")]
                    + ["--weights", weights_for(alpha), "--alpha", str(alpha), "--overwrite"],
                    work / f"log-cli{i}-{alpha}-{r}.txt",
                    env,
                )
                rounds[kind].append({"limit": lim, "cli": cli})
            # Kept as they come: a long run stopped early still has its rounds.
            (work / f"rounds-{alpha}.json").write_text(json.dumps(rounds))
        rows += summarise_rounds(rounds, alpha, work)
    return rows


def summarise_rounds(rounds: Dict[str, List[Dict]], alpha: float, work: Path) -> List[Dict]:
    """One row per featurize kind of an alpha's rounds (the last outputs compared)."""
    import pyarrow.parquet as pq

    n = pq.read_metadata(str(work / "limit-out" / "part-0.parquet")).num_rows
    rows = []
    for i, kind in enumerate(rounds):
        row = summarise_pairs(rounds[kind], n)
        diff = max_feature_difference(str(work / "limit-out"), str(work / f"cli-out-{i}"))
        row.update(alpha=alpha, kind=kind, max_abs_diff=diff)
        rows.append(row)
    return rows


def rows_from_saved_rounds(work: Path) -> List[Dict]:
    """The rows of the rounds a run kept in ``work`` (``rounds-ALPHA.json``), e.g. of a
    long run stopped after its first alpha; its last outputs must still be there."""
    rows = []
    for path in sorted(work.glob("rounds-*.json")):
        alpha = float(path.stem.split("-", 1)[1])
        rows += summarise_rounds(json.loads(path.read_text()), alpha, work)
    return rows


def summarise_pairs(pairs: List[Dict[str, Any]], n: int) -> Dict[str, Any]:
    """Medians of the pairs' figures (per photo where it says ms) and of their ratios."""

    def med(side: str, key: str) -> float:
        return statistics.median(p[side][key] for p in pairs)

    def med_kind(kind: str) -> float:
        return statistics.median(p["cli"]["cpu_by_kind_s"].get(kind, 0.0) for p in pairs)

    return {
        "images": n,
        "pairs": len(pairs),
        "limit_wall_s": med("limit", "wall_s"),
        "cli_wall_s": med("cli", "wall_s"),
        "speed_ratio": statistics.median(p["limit"]["wall_s"] / p["cli"]["wall_s"] for p in pairs),
        "limit_cpu_ms": 1000 * med("limit", "cpu_s") / n,
        "cli_cpu_ms": 1000 * med("cli", "cpu_s") / n,
        "cpu_ratio": statistics.median(p["cli"]["cpu_s"] / p["limit"]["cpu_s"] for p in pairs),
        "cli_jvm_ms": 1000 * med_kind("jvm") / n,
        "cli_workers_ms": 1000 * med_kind("python workers") / n,
        "cli_driver_ms": 1000 * med_kind("other") / n,
        "worker_peak_mib": max(p["cli"]["worker_peak_mib"] for p in pairs),
        "others_share": statistics.median(
            (p["limit"]["others_share"] + p["cli"]["others_share"]) / 2 for p in pairs
        ),
        "raw": pairs,
    }


LIMIT_COLS = [
    Col("alpha", "alpha"),
    Col("run", "kind"),
    Col("images", "images"),
    Col("pairs", "pairs"),
    Col("limit s", "limit_wall_s"),
    Col("featurize s", "cli_wall_s"),
    Col("speed ÷ limit", "speed_ratio"),
    Col("limit CPU ms/photo", "limit_cpu_ms"),
    Col("featurize CPU ms/photo", "cli_cpu_ms"),
    Col("CPU × limit", "cpu_ratio"),
    Col(
        "JVM / workers / driver ms",
        lambda r: "{:.2f} / {:.2f} / {:.2f}".format(
            r["cli_jvm_ms"], r["cli_workers_ms"], r["cli_driver_ms"]
        ),
    ),
    Col("worker peak MiB", "worker_peak_mib"),
    Col("max |Δ| vs limit", lambda r: f"{r['max_abs_diff']:.1e}"),
    Col("others' CPU", lambda r: pct(r["others_share"])),
]


def limit_table(rows: List[Dict]) -> str:
    """The Markdown table of :func:`limit_ab`'s rows."""
    return records_table(LIMIT_COLS, rows)
