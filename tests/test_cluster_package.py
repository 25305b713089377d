"""cluster.package and bootstrap-emr.sh: what the cluster gets; pins agree with pyproject."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cluster import package, spec

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "cluster" / "bootstrap-emr.sh"

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")


def _pyproject_requirements():
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {canonicalize_name(r.name): r for r in reqs}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bootstrap_script_parses_with_bash_n():
    proc = subprocess.run(["bash", "-n", str(BOOTSTRAP)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = BOOTSTRAP.read_text()
    assert "set -euo pipefail" in text
    assert "python3.11 -m pip install" in text or '"$PYTHON" -m pip install' in text
    assert re.search(r"^PYTHON=/usr/bin/python3\.11$", text, re.M)


def test_bootstrap_pins_satisfy_pyproject_ranges():
    pins = package.bootstrap_pins()
    reqs = _pyproject_requirements()
    expected = {"tensorflow-cpu", "numpy", "scipy", "pandas", "pyarrow", "pillow", "boto3"}
    assert {canonicalize_name(n) for n in pins} == expected
    for name, version in pins.items():
        req = reqs[canonicalize_name(name)]
        assert req.specifier.contains(version, prereleases=False), (
            f"bootstrap pins {name}=={version}, outside pyproject's {req}"
        )


def test_bootstrap_does_not_install_pyspark():
    # EMR's Spark 3.5.3 brings pyspark; a pip copy would shadow it and mismatch the JVM.
    pins = package.bootstrap_pins()
    assert "pyspark" not in {canonicalize_name(n) for n in pins}
    assert "pyspark" not in BOOTSTRAP.read_text().split("PINS=(")[1].split(")")[0]


def test_bootstrap_pins_parser_reads_only_the_pins_array():
    script = 'X="foo==1.0"\nPINS=(\n  "a==1.2.3"\n  \'b-c==4.5\'\n)\nY="bar==2"\n'
    assert package.bootstrap_pins(script) == {"a": "1.2.3", "b-c": "4.5"}
    with pytest.raises(ValueError, match="no PINS"):
        package.bootstrap_pins("echo hi\n")


def test_zip_holds_packages_and_their_data():
    names = set(zipfile.ZipFile(io.BytesIO(package.build_zip())).namelist())
    for required in (
        "stages/__init__.py",
        "stages/cli.py",
        "stages/featurize.py",
        "stages/log4j2.properties",
        "linalg/__init__.py",
        "cluster/spec.py",
        "cluster/bootstrap-emr.sh",
    ):
        assert required in names
    weights = [n for n in names if n.startswith("stages/weights/") and n.endswith(".h5")]
    assert weights, sorted(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert all(n.split("/")[0] in package.PACKAGES for n in names)


def test_zip_is_deterministic():
    assert package.build_zip() == package.build_zip()


def test_zip_is_importable_by_python(tmp_path):
    zpath = tmp_path / spec.ZIP_NAME
    zpath.write_bytes(package.build_zip())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(zpath)
    code = (
        "import cluster.spec, linalg, stages.errors; "
        "print(cluster.spec.__file__); print(stages.errors.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert all(spec.ZIP_NAME in line for line in lines), lines


def test_bundle_files_and_version():
    bundle = package.build_bundle()
    assert set(bundle.files) == {
        "fruits_pipeline.zip",
        "featurize.py",
        "reduce.py",
        "watch.py",
        "bootstrap-emr.sh",
        "requirements-emr.txt",
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+-[0-9a-f]{12}", bundle.version)
    assert bundle.version == package.build_bundle().version
    assert bundle.uri("fruits-eu") == f"s3://fruits-eu/code/{bundle.version}/"
    assert bundle.files["featurize.py"] == (ROOT / "stages" / "featurize.py").read_bytes()
    assert b"stages.cli" in bundle.files["reduce.py"]
    assert b"stages.cli" in bundle.files["watch.py"]
    reqs = bundle.files["requirements-emr.txt"].decode().splitlines()
    assert reqs == [f"{n}=={v}" for n, v in package.bootstrap_pins().items()]


def test_bundle_version_changes_with_the_code():
    bundle = package.build_bundle(base_version="0.1.0")
    assert bundle.version.startswith("0.1.0-")
    changed = dict(bundle.files)
    changed["featurize.py"] += b"\n# changed\n"
    renamed = {("x" + k if k == "reduce.py" else k): v for k, v in bundle.files.items()}
    versions = {
        package.content_version(bundle.files, "0.1.0"),
        package.content_version(changed, "0.1.0"),
        package.content_version(renamed, "0.1.0"),
    }
    assert len(versions) == 3
    assert package.content_version(bundle.files, "0.1.0") == bundle.version
