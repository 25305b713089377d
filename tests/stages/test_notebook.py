"""notebooks/fruits_pipeline.ipynb runs end to end on the bundled sample (nbclient)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "fruits_pipeline.ipynb"
SAMPLE = ROOT / "sample" / "fruits360"
KERNEL = "fruits-pipeline-test"


def _kernel_of_this_interpreter(jupyter_dir: Path) -> str:
    """A kernelspec that runs ipykernel with this interpreter (the venv's), whatever
    ``python3`` kernels the machine has; found first through JUPYTER_PATH."""
    spec = jupyter_dir / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "fruits-pipeline (tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return KERNEL


def _stdout(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


@pytest.mark.slow
def test_notebook_runs_the_chain_on_the_sample(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = code[0]
    assert "parameters" in params.metadata.get("tags", [])
    assert re.search(r"^RESULTS = ", params.source, re.M)
    features, results = tmp_path / "Features", tmp_path / "Results"
    params.source += (
        "\n# injected by tests/stages/test_notebook.py\n"
        f"INPUT = {str(SAMPLE)!r}\nFEATURES = {str(features)!r}\nRESULTS = {str(results)!r}\n"
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = _kernel_of_this_interpreter(tmp_path / "jupyter")

    NotebookClient(
        nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    out = _stdout(nb)
    summary = json.loads((results / "summary.json").read_text())
    got = dict(re.findall(r"\b(rows|error_rows|k|points|classes)=(\d+)", out))
    diff = float(re.search(r"reprojection_max_abs_diff=(\S+)", out).group(1))
    report = Path(re.search(r"report=(.+)", out).group(1).strip())
    images = {
        i: sum("image/png" in o.get("data", {}) for o in c.get("outputs", []))
        for i, c in enumerate(code)
    }
    matplot = [i for i, c in enumerate(code) if c.source.strip() == "%matplot plt"]
    assert got == {"rows": "100", "error_rows": "0", "k": "10", "points": "100", "classes": "10"}
    assert (summary["rows"], summary["k"], summary["features"]) == (100, 10, str(features))
    assert summary["featurize"]["images"] == 100
    # The stages' progress lines reach the cells' output (the notebook configures logging).
    assert re.search(r"^featurize: wrote 100 rows \(0 errors\)", out, re.M)
    assert re.search(r"^reduce: k=10 components explain", out, re.M)
    assert diff < 1e-3  # the saved model reproduces the projections of the photos
    # explained variance, PC1 x PC2: each once, from the %matplot cells only (Agg backend)
    assert len(matplot) == 2
    assert {i: n for i, n in images.items() if n} == {i: 1 for i in matplot}
    assert "local: a Spark session started by this notebook (Spark 3.5." in out
    assert report == results / "report.html" and report.stat().st_size > 10_000


# ------------------------------------------------------------------ stages.notebook

# A stand-in for the SparkSession Livy puts in a sparkmagic session's namespace.
_LIVY_SPARK = """
class LivySpark:
    version = "3.5.3"
    read = object()

    class sparkContext:
        master = "yarn"
"""

_PROBE = (
    _LIVY_SPARK
    + """
import json, sys
import matplotlib
from stages.notebook import notebook_environment

ns = {"spark": LivySpark()} if sys.argv[1] == "livy" else {}
env = notebook_environment(ns)
from pyspark import SparkContext

print(json.dumps({
    "kind": env.kind, "same": env.spark is ns["spark"], "magic": env.matplot_magic,
    "no_gateway": SparkContext._gateway is None and SparkContext._jvm is None,
    "backend": matplotlib.get_backend().lower(), "str": str(env),
}))
"""
)


def _no_java_env(tmp_path):
    """An environment where starting a JVM fails at once: Spark runs $JAVA_HOME/bin/java."""
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_HOME", "MPLBACKEND")}
    env["JAVA_HOME"] = str(tmp_path / "no-java")
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_helper_takes_livys_spark_and_starts_no_jvm(tmp_path):
    env = _no_java_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "livy"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["kind"] == "sparkmagic" and got["same"] is True
    assert got["no_gateway"] is True  # no local JVM was started
    assert got["magic"] is False  # no IPython under Livy: sparkmagic's own %matplot
    assert got["backend"] == "agg"
    assert got["str"] == "sparkmagic: the Livy session on the cluster (Spark 3.5.3, master yarn)"


def test_without_a_predefined_spark_the_helper_starts_one(tmp_path):
    # The control of the test above: in the same environment the local path does try to
    # start a JVM, and fails for want of Java.
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "local"], cwd=tmp_path, env=_no_java_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no-java/bin/java" in proc.stderr, proc.stderr[-2000:]
    assert "JAVA_GATEWAY_EXITED" in proc.stderr


class _Shell:
    """What the helper uses of an IPython shell: its namespace and magic registration."""

    def __init__(self):
        self.user_ns = {}
        self.magics = {}

    def register_magic_function(self, func, magic_kind, magic_name):
        self.magics[(magic_kind, magic_name)] = func


def test_helper_local_path_starts_a_session_and_registers_matplot():
    from stages.notebook import notebook_environment

    started = []
    shell = _Shell()
    ns = {"spark": None}  # a name that is not a session does not count
    env = notebook_environment(
        ns, "nb", start_local=lambda name: started.append(name) or name, shell=shell
    )
    assert (env.kind, env.spark, started) == ("local", "nb", ["nb"])
    assert env.matplot_magic is True and ("line", "matplot") in shell.magics


def test_render_figure_is_livys_matplot_png_of_the_current_figure():
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from stages.notebook import render_figure

    fig, ax = plt.subplots(figsize=(4, 3), dpi=50)
    ax.plot([0, 1], [1, 0])
    png = render_figure("plt", {"plt": plt})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (200, 150)
    assert not plt.fignum_exists(fig.number)  # closed: figures do not pile up
    with pytest.raises(NameError, match="no 'pyplot' in the notebook"):
        render_figure("pyplot", {"plt": plt})
