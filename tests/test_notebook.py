"""notebooks/fruits_pipeline.ipynb runs end to end on the bundled sample (nbclient)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
        "\n# injected by tests/test_notebook.py\n"
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
    images = [
        o
        for c in code
        for o in c.get("outputs", [])
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert got == {"rows": "100", "error_rows": "0", "k": "10", "points": "100", "classes": "10"}
    assert (summary["rows"], summary["k"], summary["features"]) == (100, 10, str(features))
    assert summary["featurize"]["images"] == 100
    assert diff < 1e-3  # the saved model reproduces the projections of the photos
    assert len(images) == 2  # explained variance, PC1 x PC2
    assert report == results / "report.html" and report.stat().st_size > 10_000
