"""Both stages through the CLI on a real Spark standalone cluster: a master and two
workers on 127.0.0.1, each its own JVM, with executors in their own JVMs and Python
workers, as on a real cluster (local mode runs tasks inside the driver's JVM).

What local mode cannot show: the broadcast weights reaching executors in other
processes, one model build per Python worker on each executor, the ``stages`` and
``linalg`` code shipping to them, Parquet written by several executors, and the
results equal to a local-mode run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from tests.conftest import ROOT, killing_one_python_worker
from tests.standalone_cluster import StandaloneCluster, run_in_group

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CLI_TIMEOUT_S = 240
EXECUTOR_MEMORY_MB = 512


def _cli() -> List[str]:
    script = Path(sys.executable).with_name("fruits-pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "stages.cli"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Master + 2 workers (1 core, 2 GB each); stopped, executors included, at the end."""
    if shutil.which("java") is None and "JAVA_HOME" not in os.environ:
        pytest.skip("no java on PATH and no JAVA_HOME: cannot start a Spark standalone cluster")
    with StandaloneCluster(tmp_path_factory.mktemp("standalone"), n_workers=2, cores=1) as c:
        yield c


@pytest.fixture(scope="module")
def cli_env(cluster, keras_home) -> Dict[str, str]:
    """Environment of the driver processes (the CLI)."""
    submit = {
        "spark.executor.memory": f"{EXECUTOR_MEMORY_MB}m",
        "spark.cores.max": "2",
        # Schedule only once both executors registered: a task set must not start on
        # the first executor alone (the test checks both were used), however long a
        # loaded machine takes to start the second (the CLI's own timeout bounds it).
        "spark.scheduler.minRegisteredResourcesRatio": "1.0",
        "spark.scheduler.maxRegisteredResourcesWaitingTime": f"{CLI_TIMEOUT_S}s",
        # Executors get no writable Keras cache: the weights must come by broadcast.
        "spark.executorEnv.KERAS_HOME": str(keras_home),
    }
    env = cluster.env()
    env.update(
        FRUITS_DRIVER_MEMORY="1g",
        FRUITS_SPARK_UI="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        # The CLI has no --conf: pyspark passes these to the spark-submit it launches.
        PYSPARK_SUBMIT_ARGS=" ".join(
            [*(f"--conf {shlex.quote(f'{k}={v}')}" for k, v in submit.items()), "pyspark-shell"]
        ),
    )
    env.pop("FRUITS_SPARK_MASTER", None)
    return env


def _run_cli(args: List[str], env: Dict[str, str], cluster: StandaloneCluster) -> dict:
    """Run ``fruits-pipeline ARGS --master <cluster>``; its JSON line from stdout."""
    proc = run_in_group([*_cli(), *args, "--master", cluster.master_url], env, ROOT, CLI_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"fruits-pipeline {' '.join(args)} exited {proc.returncode}\n"
        f"stderr:\n{proc.stderr[-4000:]}\n{cluster.logs()}"
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON on stdout: {proc.stdout!r}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("standalone_out")


@pytest.fixture(scope="module")
def cluster_featurize(cluster, cli_env, out_dir) -> dict:
    """``fruits-pipeline featurize sample/fruits360 OUT/Features`` on the cluster: its report."""
    return _run_cli(
        ["featurize", "sample/fruits360", str(out_dir / "Features"), "--weights", "bundled"],
        cli_env,
        cluster,
    )


@pytest.fixture(scope="module")
def cluster_reduce(cluster, cli_env, out_dir, cluster_featurize) -> dict:
    """``fruits-pipeline reduce OUT/Features OUT/Results --k 5`` on the cluster."""
    return _run_cli(
        ["reduce", str(out_dir / "Features"), str(out_dir / "Results"), "--k", "5"],
        cli_env,
        cluster,
    )


@pytest.fixture(scope="module")
def local_results(spark, sample_features, tmp_path_factory) -> Path:
    """Stage 2 in local mode on the local-mode features (the reference)."""
    from stages.reduce import reduce_features

    out = tmp_path_factory.mktemp("local_reduce") / "Results"
    reduce_features(spark, str(sample_features), str(out), k=5, variance=None)
    return out


def _by_path(table, column: str) -> Dict[str, np.ndarray]:
    return {
        p: np.asarray(v, dtype=np.float64)
        for p, v in zip(table.column("path").to_pylist(), table.column(column).to_pylist())
    }


def _read(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(str(path))


def test_featurize_ran_on_both_workers_building_the_model_once_per_python_worker(
    cluster_featurize,
):
    report = cluster_featurize
    assert report["images"] == 100
    assert report["errors"] == 0
    assert report["partitions"] == 2
    assert report["python_workers"] == 2, f"{report}: expected a Python worker per executor"
    assert report["model_builds"] == 2
    assert "worker_pids" not in report


def test_the_master_ran_both_apps_with_executors_on_both_workers(
    cluster, cluster_featurize, cluster_reduce
):
    state = cluster.state()
    assert state is not None, cluster.logs()
    assert state["aliveworkers"] == 2
    apps = {a["name"]: a for a in state["completedapps"]}
    assert set(apps) == {"fruits-pipeline featurize", "fruits-pipeline reduce"}, state
    assert {a["state"] for a in apps.values()} == {"FINISHED"}
    assert {a["memoryperexecutor"] for a in apps.values()} == {EXECUTOR_MEMORY_MB}
    # Each worker launched an executor of the featurize app (its folder in --work-dir).
    app_id = apps["fruits-pipeline featurize"]["id"]
    executors = {
        w: sorted(p.name for p in (cluster.workdir / w / app_id).glob("*") if p.is_dir())
        for w in ("worker-0", "worker-1")
    }
    assert all(executors.values()), executors


def test_cluster_features_equal_local_mode(cluster_featurize, out_dir, sample_features):
    ours = _read(out_dir / "Features")
    local = _read(sample_features)
    assert ours.column("error").null_count == ours.num_rows == 100
    a, b = _by_path(ours, "features"), _by_path(local, "features")
    assert a.keys() == b.keys()
    assert all(p.startswith(f"file:{ROOT}/sample/fruits360/") for p in a)
    labels = dict(zip(ours.column("path").to_pylist(), ours.column("label").to_pylist()))
    assert labels == dict(zip(local.column("path").to_pylist(), local.column("label").to_pylist()))
    assert "Apple Braeburn" in labels.values()
    diff = max(float(np.max(np.abs(a[p] - b[p]))) for p in a)
    assert diff <= 1e-5, f"features differ from local mode by {diff}"


def _aligned(ours: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``ours`` with each column's sign flipped to agree with ``ref`` (eigenvector signs
    are a convention; the pipeline fixes them, but compare robustly)."""
    signs = np.sign(np.sum(ours * ref, axis=0))
    signs[signs == 0] = 1.0
    return ours * signs, signs


def test_cluster_projections_equal_local_mode(cluster_reduce, out_dir, local_results):
    assert cluster_reduce["rows"] == 100
    assert cluster_reduce["error_rows"] == 0
    assert cluster_reduce["k"] == 5
    ours = _by_path(_read(out_dir / "Results" / "projections"), "pca")
    ref = _by_path(_read(local_results / "projections"), "pca")
    assert ours.keys() == ref.keys()
    paths = sorted(ref)
    A = np.stack([ours[p] for p in paths])
    B = np.stack([ref[p] for p in paths])
    assert A.shape == B.shape == (100, 5)
    A, signs = _aligned(A, B)
    scale = float(np.max(np.abs(B)))
    assert scale > 0
    err = float(np.max(np.abs(A - B)))
    assert err <= 1e-6 * scale, f"projections differ by {err} (scale {scale}, signs {signs})"


def test_cluster_model_and_summary_equal_local_mode(cluster_reduce, out_dir, local_results):
    from stages.reduce.pca_model import PCAModel

    ours = PCAModel.load(str(out_dir / "Results"))
    ref = PCAModel.load(str(local_results))
    np.testing.assert_allclose(ours.pca_fit.mean, ref.pca_fit.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.pca_fit.eigenvalues[:5], ref.pca_fit.eigenvalues[:5], rtol=1e-6)
    cos = np.abs(np.sum(ours.pca_fit.components * ref.pca_fit.components, axis=0))
    assert np.all(cos >= 1 - 1e-6), cos
    summary = json.loads((out_dir / "Results" / "summary.json").read_text())
    local = json.loads((local_results / "summary.json").read_text())
    assert summary["rows"] == local["rows"] == 100
    np.testing.assert_allclose(
        summary["explained_variance_ratio"], local["explained_variance_ratio"], rtol=1e-6
    )
    assert summary["features_model"]["weights_sha256"] == local["features_model"]["weights_sha256"]


def test_a_killed_python_worker_on_an_executor_is_retried(cluster, cli_env, tmp_path):
    # The cluster twin of the local-mode test in test_no_image_lost.py: a Python worker
    # killed on an executor (another JVM's child) fails its task, which is retried.
    from tests.stages.test_no_image_lost import assert_one_row_per_image

    photos = tmp_path / "photos"
    for i in range(3):
        shutil.copytree(ROOT / "sample" / "fruits360", photos / f"c{i}", ignore=_not_images)
    out = tmp_path / "Features"
    argv = ["featurize", str(photos), str(out), "--weights", "random:5", "--alpha", "0.35"]
    with killing_one_python_worker(lambda: [p.pid for p in cluster.procs]) as killed:
        report = _run_cli(argv, cli_env, cluster)
    assert killed, "no Python worker was seen to kill"
    rows = assert_one_row_per_image(out, photos)
    assert report["images"] == len(rows) == 300 and report["errors"] == 0


def _not_images(folder: str, names: List[str]) -> List[str]:
    return [n for n in names if not n.lower().endswith(".jpg") and "." in n]
