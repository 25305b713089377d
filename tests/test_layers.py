"""The package's layers only point down, and no module reaches into another's privates."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "linalg", "cluster")

# Lowest first. A module may import its own layer and the ones below, never above.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("linalg", "linalg.kernels"),
    ("linalg.distributed",),
    (  # the shared base: errors, the features contract, parameters, files, Spark helpers
        "stages",
        "stages.errors",
        "stages.logs",
        "stages.contract",
        "stages.params",
        "stages.fs",
        "stages.hadoopfs",
        "stages.outputs",
        "stages.s3a",
        "stages.session",
        "stages.sparkutil",
        "stages.arrow_rdd",
        "stages.listing",
    ),
    (  # the models: featurizer, PCA estimator and fitted PCA over the features matrix
        "stages.images",
        "stages.model",
        "stages.engine",
        "stages.feature_matrix",
        "stages.pca_model",
        "stages.pca",
    ),
    (  # the stages, the app, the report, the AWS code
        "stages.featurize",
        "stages.incremental",
        "stages.watch",
        "stages.reduce",
        "stages.update",
        "stages.search",
        "stages.serve",
        "stages.notebook",
        "stages.report",
        "stages.report.data",
        "stages.report.figures",
        "stages.report.html",
        "stages.static",
        "stages.weights",
        "cluster",
        "cluster.sizing",
        "cluster.spec",
        "cluster.guard",
        "cluster.emr",
        "cluster.package",
        "cluster.policy",
    ),
    ("stages.search_cli", "cluster.cli"),  # registered by stages.cli, never the reverse
    ("stages.cli",),
    (
        "stages.steps",
        "stages.steps.featurize",
        "stages.steps.reduce",
        "stages.steps.watch",
    ),
)
LAYER: Dict[str, int] = {m: i for i, names in enumerate(LAYERS) for m in names}


def _modules() -> Iterator[Tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def _imports(path: Path) -> Iterator[Tuple[str, str, int]]:
    """``(module, name or "", line)`` of every import, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name, node.lineno


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def test_every_module_has_a_layer():
    missing = sorted(name for name, _ in _modules() if name not in LAYER)
    assert not missing, f"give these modules a layer in {__file__}: {missing}"


def test_imports_only_point_down():
    upward = []
    for name, path in _modules():
        for module, item, line in _imports(path):
            target = f"{module}.{item}" if f"{module}.{item}" in LAYER else module
            if _ours(target) and LAYER.get(target, -1) > LAYER[name]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def _private_uses(path: Path) -> Iterator[Tuple[str, int]]:
    """``module._name`` read through a module of ours imported by name (``hadoopfs._x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in LAYER:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name) and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{modules[node.value.id]}.{node.attr}", node.lineno


def test_no_module_uses_a_private_name_of_another():
    private = []
    for name, path in _modules():
        for module, item, line in _imports(path):
            if _ours(module) and module != name and item.startswith("_"):
                private.append(f"{path.relative_to(ROOT)}:{line} imports {module}.{item}")
        for used, line in _private_uses(path):
            private.append(f"{path.relative_to(ROOT)}:{line} uses {used}")
    assert not private, "\n".join(private)


def test_linalg_kernels_need_only_numpy():
    found = {m.split(".")[0] for m, _, _ in _imports(ROOT / "linalg" / "kernels.py")}
    assert found <= {"__future__", "dataclasses", "typing", "numpy", "scipy", "math"}, found


@pytest.mark.parametrize(
    "module, absent",
    [
        # Stage 2 and the index never decode an image nor build a model.
        ("stages.reduce", ("PIL", "tensorflow", "keras")),
        ("stages.update", ("PIL", "tensorflow", "keras")),
        # The CLI parses (and refuses) arguments before Spark or TensorFlow are loaded.
        ("stages.cli", ("pyspark", "tensorflow", "PIL", "boto3")),
        ("stages.params", ("pyspark", "tensorflow", "PIL", "numpy")),
    ],
)
def test_heavy_libraries_stay_out_of_modules_that_do_not_need_them(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]", f"importing {module} loaded {out}"
