"""cluster/bootstrap-emr.sh run for real in a sandbox standing in for an EMR node.

- ``sudo``, ``dnf`` and ``aws`` are commands on ``PATH`` that log their calls: ``sudo``
  runs its command as the current user, ``dnf`` must not be needed, ``aws s3 cp``
  serves ``s3://`` from a local folder holding the bundle ``emr up`` would upload.
- A throw-away venv stands in for the node's ``/usr/bin/python3.11``.  Its libraries
  are this interpreter's own, linked in (TensorFlow is 0.5 GB: not downloaded in a
  test), without pyspark (on a node, pyspark is EMR's, on Spark's ``PYTHONPATH``) and
  without the project.  Only the ``pip install`` of the pinned libraries is stubbed
  (recorded); the project's own ``pip install`` of the wheel is real.

Then that Python must import the installed project, not this checkout, and the bundled
weights must be where a step given ``--weights bundled`` looks for them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cluster import package, spec
from tests.conftest import needs_bash

pytestmark = pytest.mark.cluster  # a throw-away venv and a real pip install

BUCKET = "fruits-eu"
# Never linked into the sandbox: Spark's Python (EMR's own) and every trace of the project.
_LEFT_OUT = ("pyspark", "py4j", "fruits_pipeline", "__editable__", "sagemaker_pyspark")
_PROJECT = set(package.PACKAGES)

SUDO = """#!/bin/sh
echo "$*" >> "$SANDBOX_LOG/sudo"
exec "$@"
"""
DNF = """#!/bin/sh
echo "$*" >> "$SANDBOX_LOG/dnf"
echo "dnf stub: python3.11 is already on this node" >&2
exit 1
"""
# aws s3 cp [--only-show-errors] s3://BUCKET/KEY DEST, served from $FAKE_S3/BUCKET/KEY.
AWS = """#!/usr/bin/env bash
set -eu
echo "$*" >> "$SANDBOX_LOG/aws"
[ "${1:-} ${2:-}" = "s3 cp" ] || { echo "aws stub: unsupported: $*" >&2; exit 2; }
shift 2
args=()
for a in "$@"; do [ "$a" = "--only-show-errors" ] || args+=("$a"); done
src="${args[0]}"; dst="${args[1]}"
[[ "$src" == s3://* ]] || { echo "aws stub: not an s3 URI: $src" >&2; exit 2; }
obj="$FAKE_S3/${src#s3://}"
[ -f "$obj" ] || { echo "fatal error: An error occurred (404): $src does not exist" >&2; exit 1; }
cp "$obj" "$dst"
"""
# The node's python3.11: the pinned-libraries install is recorded, everything else
# (pip install of the wheel, the import checks) runs the sandbox venv's real Python.
PYTHON = """#!/usr/bin/env bash
for a in "$@"; do
  case "$a" in
    tensorflow-cpu==*) printf '%s\\n' "$@" > "$SANDBOX_LOG/pins"; exit 0 ;;
  esac
done
exec "{real}" "$@"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _link_site_packages(dest: Path, keep) -> None:
    dest.mkdir()
    seen = set()
    for key in ("purelib", "platlib"):
        for entry in sorted(Path(sysconfig.get_paths()[key]).iterdir()):
            if entry.name in seen or entry.suffix == ".pth" or not keep(entry.name):
                continue
            seen.add(entry.name)
            (dest / entry.name).symlink_to(entry)


def _venv_purelib(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """The sandbox after the bootstrap ran: paths, the bundle and the script's output."""
    tmp = tmp_path_factory.mktemp("node")
    logs, bin_dir, s3 = tmp / "log", tmp / "bin", tmp / "s3"
    logs.mkdir()
    bin_dir.mkdir()
    # the code folder `emr up` uploads, as it would upload it
    bundle = package.build_bundle()
    code = bundle.uri(BUCKET)
    folder = s3 / code[len("s3://") :]
    folder.mkdir(parents=True)
    for name, data in bundle.files.items():
        (folder / name).write_bytes(data)
    # the node's python3.11
    venv = tmp / "python3.11"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    real = venv / "bin" / "python"
    purelib = _venv_purelib(real)

    def is_library(name: str) -> bool:
        stem = name.split("-")[0].split(".")[0]
        return not name.startswith(_LEFT_OUT) and stem not in _PROJECT

    _link_site_packages(tmp / "libs", is_library)
    (purelib / "pinned-libraries.pth").write_text(f"{tmp / 'libs'}\n")
    # what spark-submit and Livy put on PYTHONPATH on a node: Spark's own pyspark
    _link_site_packages(tmp / "spark-python", lambda n: n.startswith(("pyspark", "py4j")))
    _write_exe(bin_dir / "sudo", SUDO)
    _write_exe(bin_dir / "dnf", DNF)
    _write_exe(bin_dir / "aws", AWS)
    _write_exe(bin_dir / "python3.11", PYTHON.replace("{real}", str(real)))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "SANDBOX_LOG": str(logs),
        "FAKE_S3": str(s3),
        "FRUITS_BOOTSTRAP_PYTHON": str(bin_dir / "python3.11"),
        "FRUITS_BOOTSTRAP_WEIGHTS_DIR": str(tmp / "opt" / "fruits-pipeline" / "weights"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PIP_NO_INDEX": "1",  # no network: anything pip would fetch fails the test
    }
    request = spec.build_request(spec.ClusterOptions(bucket=BUCKET), code)
    action = request["BootstrapActions"][0]["ScriptBootstrapAction"]
    script = s3 / action["Path"][len("s3://") :]
    proc = subprocess.run(
        ["bash", str(script), *action["Args"]], cwd=tmp, env=env, capture_output=True, text=True
    )
    return {
        "tmp": tmp,
        "proc": proc,
        "bundle": bundle,
        "python": real,
        "purelib": purelib,
        "logs": logs,
        "weights": Path(env["FRUITS_BOOTSTRAP_WEIGHTS_DIR"]),
        "spark_python": tmp / "spark-python",
    }


@needs_bash
def test_bootstrap_installs_the_project_into_the_nodes_python(node):
    proc = node["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = node["bundle"].version.replace("-", "+", 1)
    assert f"bootstrap: done: Version: {version}" in proc.stderr
    logs = node["logs"]
    pins = (logs / "pins").read_text().split()
    assert pins[pins.index("install") + 1 :][-len(package.bootstrap_pins()) :] == [
        f"{n}=={v}" for n, v in package.bootstrap_pins().items()
    ]
    assert not (logs / "dnf").exists()  # python3.11 and its pip were there
    (fetched,) = (logs / "aws").read_text().splitlines()
    wheel_uri = node["bundle"].uri(BUCKET) + node["bundle"].wheel
    assert fetched.split()[:4] == ["s3", "cp", "--only-show-errors", wheel_uri]

    # A step or a Livy session on the node: Spark's pyspark on PYTHONPATH, any directory.
    code = """
import importlib.metadata, json, pyspark, stages, cluster, linalg
import stages.cli, stages.featurize.frame, stages.notebook, stages.reduce.full, stages.report
from stages.featurize.model import BUNDLED_WEIGHTS
print(json.dumps({
    "files": [m.__file__ for m in (stages, cluster, linalg)],
    "version": importlib.metadata.version("fruits-pipeline"),
    "requires": importlib.metadata.requires("fruits-pipeline"),
    "bundled": str(BUNDLED_WEIGHTS), "bundled_is_file": BUNDLED_WEIGHTS.is_file(),
    "pyspark": pyspark.__file__,
}))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(node["spark_python"])}
    out = subprocess.run(
        [str(node["python"]), "-c", code], cwd="/", env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    purelib = node["purelib"]
    for path in got["files"]:
        assert Path(path).is_relative_to(purelib), path  # installed, not this checkout
    assert got["version"] == version
    assert got["requires"] == [f"{n}=={v}" for n, v in package.bootstrap_pins().items()]
    assert got["bundled_is_file"] and Path(got["bundled"]).is_relative_to(purelib)
    assert Path(got["pyspark"]).is_relative_to(node["spark_python"])

    # the console script is on the node too
    cli = node["python"].parent / "fruits-pipeline"
    help_out = subprocess.run([str(cli), "--help"], env=env, capture_output=True, text=True)
    assert help_out.returncode == 0, help_out.stderr[-2000:]
    assert "featurize" in help_out.stdout


@needs_bash
def test_bootstrap_puts_the_bundled_weights_where_steps_look(node):
    from cluster.options import _bundled_on_nodes
    from stages.featurize.model import BUNDLED_WEIGHTS

    assert node["proc"].returncode == 0, node["proc"].stderr[-3000:]
    step_weights = Path(_bundled_on_nodes(None)["weights"])  # what `emr submit` passes
    assert step_weights.parent == Path(spec.NODE_WEIGHTS_DIR)
    on_node = node["weights"] / step_weights.name  # the sandbox's NODE_WEIGHTS_DIR
    sums = dict(
        reversed(line.split()) for line in (node["weights"] / "SHA256SUMS").read_text().splitlines()
    )
    digest = hashlib.sha256(on_node.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(BUNDLED_WEIGHTS.read_bytes()).hexdigest()
    assert sums[step_weights.name] == digest
    assert (node["weights"] / "NOTICE.md").is_file()
    assert on_node.stat().st_mode & 0o004  # readable by YARN's containers


@needs_bash
def test_bootstrap_fails_first_thing_when_the_wheel_is_missing(node, tmp_path):
    s3 = node["tmp"] / "s3"
    env = dict(
        PATH=f"{node['tmp'] / 'bin'}:/usr/bin:/bin",
        HOME=str(tmp_path),
        SANDBOX_LOG=str(tmp_path),
        FAKE_S3=str(s3),
        FRUITS_BOOTSTRAP_PYTHON=str(node["tmp"] / "bin" / "python3.11"),
        FRUITS_BOOTSTRAP_WEIGHTS_DIR=str(tmp_path / "weights"),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    script = next(s3.rglob("bootstrap-emr.sh"))
    missing = f"s3://{BUCKET}/code/0.1.0-000000000000/fruits_pipeline-0.1.0+0-py3-none-any.whl"
    proc = subprocess.run(
        ["bash", str(script), missing], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f"{missing} does not exist" in proc.stderr
    # before anything was installed: seconds, not a TensorFlow install later
    assert "pip install" not in proc.stderr
    assert not (tmp_path / "pins").exists()
    assert not (tmp_path / "weights").exists()
