"""The package's rooms only point down, nothing imports in a circle, and no module reaches
into another's privates."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "linalg", "cluster")

# The rooms, lowest first. A module may import its own room and the rooms below, never above;
# inside a room the imports must still form no circle (test_no_import_circle).
ROOMS: Tuple[Tuple[str, ...], ...] = (
    ("stages",),  # the version only
    ("linalg",),  # the numerics: moments, PCA, the distributed matrices, the vector index
    ("stages.base",),  # errors, logging, parameters, the features contract, the session
    ("stages.storage",),  # local and Hadoop files, atomic outputs, the FEATURES table
    ("stages.featurize",),  # stage 1
    ("stages.reduce",),  # stage 2 and everything it writes to RESULTS
    ("stages.search",),  # the app: queries, serve, its CLI
    ("stages.watch_listing", "stages.report", "stages.notebook", "cluster"),  # both stages; AWS
    ("stages.watch",),
    ("stages.cli",),
    ("stages.steps",),
)
# Sub-packages whose face (``__init__``) is an entry point: it imports its own modules, so
# none of them may import it (that would be a circle through the face).
FACES = ("stages.featurize", "stages.reduce", "stages.search")
# Modules that parse arguments before anything heavy loads: their commands import the
# stage they run inside the command (`--help` and a bad argument never start Spark).
CLI_MODULES = ("stages.cli", "stages.search.cli", "cluster.cli", "stages.steps")
# Function-level imports elsewhere: only of heavy or optional libraries, each for a reason.
HEAVY = {
    "tensorflow": "the Keras engine only; LiteRT runs never load it",
    "keras": "as tensorflow",
    "ai_edge_litert": "the LiteRT engine, where its wheel exists",
    "faiss": "only an IVF index needs it",
    "fastapi": "only `serve` needs the web stack",
    "starlette": "as fastapi",
    "uvicorn": "as fastapi",
    "PIL": "stage 2, the CLI and the index never decode an image",
    "pyspark": "the CLI checks its arguments before Spark loads",
    "py4j": "as pyspark",
    "pyarrow": "as pyspark (its Arrow paths)",
    "boto3": "AWS calls only",
    "botocore": "as boto3",
    "matplotlib": "the report and the notebook only",
    "IPython": "inside a notebook only",
}
# Our own modules imported inside a function outside the CLI, each for a reason.
LAZY_OURS: Dict[Tuple[str, str], str] = {
    ("stages.reduce.pca_model", "stages.featurize.engine"): "PCAModel.featurizer: the model",
    ("stages.reduce.pca_model", "stages.featurize.litert"): "as stages.featurize.engine",
    ("stages.reduce.pca_model", "stages.featurize.model"): "as stages.featurize.engine",
    ("stages.reduce.pca_model", "stages.featurize.images"): "PCAModel.project_images: Pillow",
    ("stages.report.data", "stages.featurize.images"): "thumbnails: Pillow",
    ("stages.notebook", "stages.base.session"): "a local session only outside sparkmagic",
    # the emr command line's options (split from cluster.cli): --help never loads numpy
    ("cluster.options", "stages.featurize.model"): "--weights bundled on EMR only",
}


def _room(module: str) -> int:
    best, found = "", -1
    for i, names in enumerate(ROOMS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, found = name, i
    return found


def _modules() -> Iterator[Tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


MODULES: Dict[str, Path] = dict(_modules())


def _imports(path: Path) -> Iterator[Tuple[str, str, int, bool]]:
    """``(module, name or "", line, inside a function)`` of every import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node.lineno, id(node) not in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name, node.lineno, id(node) not in top


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _target(module: str, item: str) -> str:
    """The module an import loads: ``from stages.storage import hadoopfs`` is a module."""
    return f"{module}.{item}" if f"{module}.{item}" in MODULES else module


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, item, _, _ in _imports(path):
            target = _target(module, item)
            if _ours(target) and target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_every_module_has_a_room():
    missing = sorted(name for name in MODULES if _room(name) < 0)
    assert not missing, f"give these modules a room in {__file__}: {missing}"


def test_imports_only_point_down():
    upward = []
    for name, path in MODULES.items():
        for module, item, line, _ in _imports(path):
            target = _target(module, item)
            if _ours(target) and _room(target) > _room(name):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def _circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    # Function-level imports count: a circle hidden inside a function is still a circle.
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_the_face_of_its_own_package():
    inward = []
    for name, path in MODULES.items():
        for face in FACES:
            if name.startswith(face + "."):
                for module, item, line, _ in _imports(path):
                    if _target(module, item) == face:
                        inward.append(f"{path.relative_to(ROOT)}:{line} imports {face}")
    assert not inward, "\n".join(inward)


def test_function_level_imports_only_where_they_have_a_reason():
    unexplained = []
    for name, path in MODULES.items():
        if any(name == c or name.startswith(c + ".") for c in CLI_MODULES):
            continue
        for module, item, line, inside in _imports(path):
            if not inside:
                continue
            target = _target(module, item)
            root = module.split(".")[0]
            if _ours(target):
                if (name, target) not in LAZY_OURS:
                    unexplained.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            elif root not in HEAVY:
                unexplained.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not unexplained, "hoist these to the top of their module:\n" + "\n".join(unexplained)


def _private_uses(path: Path) -> Iterator[Tuple[str, int]]:
    """``module._name`` read through a module of ours imported by name (``hadoopfs._x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
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
    for name, path in MODULES.items():
        for module, item, line, _ in _imports(path):
            if _ours(module) and module != name and item.startswith("_"):
                private.append(f"{path.relative_to(ROOT)}:{line} imports {module}.{item}")
        for used, line in _private_uses(path):
            private.append(f"{path.relative_to(ROOT)}:{line} uses {used}")
    assert not private, "\n".join(private)


def test_linalg_kernels_need_only_numpy():
    found = {m.split(".")[0] for m, _, _, _ in _imports(ROOT / "linalg" / "kernels.py")}
    assert found <= {"__future__", "dataclasses", "typing", "numpy", "scipy", "math"}, found


def test_no_file_is_too_long_to_hold():
    long = []
    for path in MODULES.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > 400:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "split these (400 lines at most):\n" + "\n".join(long)


@pytest.mark.parametrize(
    "module, absent",
    [
        # Stage 2 and the index never decode an image nor build a model.
        ("stages.reduce", ("PIL", "tensorflow", "keras")),
        ("stages.reduce.update", ("PIL", "tensorflow", "keras")),
        # The CLI parses (and refuses) arguments before Spark or TensorFlow are loaded.
        ("stages.cli", ("pyspark", "tensorflow", "PIL", "boto3")),
        ("stages.base.params", ("pyspark", "tensorflow", "PIL", "numpy")),
    ],
)
def test_heavy_libraries_stay_out_of_modules_that_do_not_need_them(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]", f"importing {module} loaded {out}"


def test_building_the_parser_loads_nothing_heavy():
    # Every command's parser (search and cluster ones too) is built before an argument is
    # checked: a bad argument is refused without Spark, TensorFlow or Pillow in memory.
    heavy = ("pyspark", "tensorflow", "PIL", "boto3", "faiss", "fastapi")
    code = (
        "import sys, stages.cli; stages.cli.build_parser(); "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]", f"building the CLI's parser loaded {out}"
