"""How often Spark ML's PCA returns an invalid answer, with pure-Java and native LAPACK.

Spark ML's ``PCA.fit`` takes a full SVD of the d x d covariance with Breeze, which
calls LAPACK ``dgesdd``; dev.ludovic.netlib gives it the pure-Java F2J translation
unless a native ``liblapack.so.3`` loads (``JNILAPACK``).  On a rank-deficient
covariance F2J's ``dgesdd`` sometimes returns ``info = 0`` with wrong singular values
and vectors.  This script measures how often, on the same standardised rows, each
LAPACK gives an answer that fails :func:`linalg.kernels.pca_answer_problems`
(orthonormal components; ratios equal to the variance the data has along them).

Each trial multiplies the rows by ``1 + 1e-15 * noise`` (a rounding-level change, as
a different summation order in Spark makes between runs), so the trials are the
run-to-run variation a user sees.  Both LAPACKs run in their own JVM (one
subprocess each) on the same rows and trials.

    python benchmarks/spark_ml_lapack.py                          # synthetic rows
    python benchmarks/spark_ml_lapack.py --features demo-output/Features --trials 30

The synthetic rows mimic MobileNetV2 features of a small sample: n < d, many
all-zero columns, a few strong factors.  Writes ``results/spark_ml_lapack.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import RESULTS_DIR, emit, quiet_env, run_worker
from benchmarks._table import table

F2J = "-Ddev.ludovic.netlib.lapack.nativeLibPath=/nonexistent/liblapack.so"


def _rows(features: str, n: int, d: int, seed: int) -> np.ndarray:
    """Standardised rows (Spark ML's StandardScaler convention: ddof 1, zero std -> 0)."""
    if features:
        import pyarrow.parquet as pq

        t = pq.read_table(features, columns=["features", "error"]).to_pydict()
        X = np.array([f for f, e in zip(t["features"], t["error"]) if e is None], np.float64)
    else:
        rng = np.random.default_rng(seed)
        live = rng.random(d) < 0.5  # about half the columns are all zero
        factors = rng.standard_normal((n, 8)) * np.geomspace(8, 1, 8)
        X = np.maximum(factors @ rng.standard_normal((8, d)) + rng.standard_normal((n, d)), 0)
        X[:, ~live] = 0.0
    std = X.std(axis=0, ddof=1)
    return np.where(std > 0, (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0), 0.0)


def _worker(args) -> None:
    quiet_env()
    from pyspark.ml.feature import PCA
    from pyspark.ml.linalg import Vectors

    from linalg.kernels import pca_answer_problems
    from stages.base.session import spark_session
    from stages.reduce.sparkml import spark_lapack

    conf = {"spark.ui.showConsoleProgress": "false"}
    if args.lapack == "f2j":
        conf["spark.driver.extraJavaOptions"] = F2J
    spark = spark_session("spark-ml-lapack", master="local[2]", conf=conf)
    Z = _rows(args.features, args.n, args.d, args.seed)
    total = float(np.count_nonzero(np.abs(Z).max(axis=0) > 0))
    rng = np.random.default_rng(args.seed + 1)
    invalid: List[int] = []
    reasons: List[str] = []
    t0 = time.perf_counter()
    for trial in range(args.trials):
        Zt = Z if trial == 0 else Z * (1 + 1e-15 * rng.standard_normal(Z.shape))
        df = spark.createDataFrame([(Vectors.dense(r),) for r in Zt], ["x"])
        model = PCA(k=args.k, inputCol="x", outputCol="p").fit(df)
        V = model.pc.toArray()
        problems = pca_answer_problems(
            V, model.explainedVariance.toArray(), (Zt @ V).var(axis=0, ddof=1), total
        )
        if problems:
            invalid.append(trial)
            reasons.append(problems[0])
    emit(
        {
            "lapack": spark_lapack(spark),
            "rows": int(Z.shape[0]),
            "columns": int(Z.shape[1]),
            "nonzero_columns": int(total),
            "trials": args.trials,
            "invalid": len(invalid),
            "invalid_trials": invalid,
            "first_reasons": reasons[:3],
            "seconds": time.perf_counter() - t0,
        }
    )
    spark.stop()


def report(runs: Dict[str, Any]) -> None:
    """Print one row per LAPACK asked for, an example of a wrong answer under it."""
    body, examples = [], []
    for lapack, r in runs.items():
        share = r["invalid"] / max(1, r["trials"])
        shape = f"{r['rows']} x {r['columns']} ({r['nonzero_columns']})"
        body.append([lapack, r["lapack"], shape, f"{r['invalid']}/{r['trials']} ({share:.0%})"])
        examples += [f"{lapack}: e.g. {reason}" for reason in r["first_reasons"][:1]]
    headers = ["asked for", "LAPACK used", "rows x cols (non-zero)", "invalid answers"]
    print(table(headers, body))
    for line in examples:
        print(line)
    if runs["native"]["lapack"] != "JNILAPACK":
        print("note: no native liblapack.so.3 loaded (install Debian's libopenblas0 or liblapack3)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default="", help="a features Parquet (default: synthetic)")
    p.add_argument("--n", type=int, default=100, help="synthetic rows")
    p.add_argument("--d", type=int, default=1280, help="synthetic columns")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lapack", choices=["f2j", "native"], help=argparse.SUPPRESS)
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _worker(args)
        return 0
    common = [f"--n={args.n}", f"--d={args.d}", f"--k={args.k}", f"--trials={args.trials}"]
    common += [f"--seed={args.seed}"] + ([f"--features={args.features}"] if args.features else [])
    runs: Dict[str, Any] = {}
    logs = Path(tempfile.mkdtemp(prefix="spark-ml-lapack-"))
    for lapack in ("f2j", "native"):
        runs[lapack] = run_worker(
            Path(__file__), ["--_worker", f"--lapack={lapack}", *common], logs / f"{lapack}.log"
        )
    report(runs)
    import json

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "spark_ml_lapack.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
