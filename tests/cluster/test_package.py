"""cluster.package and bootstrap-emr.sh: what the cluster gets; pins agree with pyproject."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cluster import package, spec
from stages.base.errors import UsageError
from tests.conftest import ROOT, needs_bash

BOOTSTRAP = ROOT / "cluster" / "bootstrap-emr.sh"

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip(
        "tomli", reason="Python < 3.11 needs tomli to read pyproject.toml"
    )


def _pyproject_requirements():
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {canonicalize_name(r.name): r for r in reqs}


@needs_bash
def test_bootstrap_script_parses_with_bash_n():
    proc = subprocess.run(["bash", "-n", str(BOOTSTRAP)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = BOOTSTRAP.read_text()
    assert "set -euo pipefail" in text
    assert "python3.11 -m pip install" in text or '"$PYTHON" -m pip install' in text
    # the node's Python, unless a test sandbox says otherwise
    assert re.search(r'^PYTHON="\$\{FRUITS_BOOTSTRAP_PYTHON:-/usr/bin/python3\.11\}"$', text, re.M)
    assert spec.PYTHON == "/usr/bin/python3.11"


def test_bootstrap_pins_satisfy_pyproject_ranges():
    pins = package.bootstrap_pins()
    reqs = _pyproject_requirements()
    expected = {
        "tensorflow-cpu", "ai-edge-litert", "numpy", "scipy", "pandas", "pyarrow", "pillow",
        "boto3", "matplotlib",
    }  # fmt: skip
    expected.add("faiss-cpu")  # reduce's search index, above the exact limit
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


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _wheel(version="0.1.0-0123456789ab"):
    return zipfile.ZipFile(io.BytesIO(package.build_wheel(version)))


def test_wheel_holds_packages_and_their_data():
    names = set(_wheel().namelist())
    for required in (
        "stages/__init__.py",
        "stages/cli.py",
        "stages/featurize/frame.py",
        "stages/steps/featurize.py",
        "stages/notebook.py",
        "stages/base/log4j2.properties",
        "stages/weights/SHA256SUMS",
        "stages/weights/mobilenet_v2_imagenet_alpha0.35_224_no_top.h5",
        "linalg/__init__.py",
        "cluster/spec.py",
        "cluster/sizing.py",
        "cluster/bootstrap-emr.sh",
    ):
        assert required in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    info = "fruits_pipeline-0.1.0+0123456789ab.dist-info"
    assert all(n.split("/")[0] in (*package.PACKAGES, info) for n in names), sorted(names)
    assert {n for n in names if n.startswith(info)} == {
        f"{info}/{f}" for f in ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt")
    }


def test_wheel_metadata_agrees_with_pyproject():
    project = _pyproject()
    wheel = _wheel()
    info = "fruits_pipeline-0.1.0+0123456789ab.dist-info"
    meta = wheel.read(f"{info}/METADATA").decode()
    fields = [tuple(line.split(": ", 1)) for line in meta.splitlines()]
    assert ("Name", project["project"]["name"]) in fields
    import stages

    assert project["project"]["dynamic"] == ["version"]  # one version: stages.__version__
    assert ("Version", stages.__version__ + "+0123456789ab") in fields
    assert ("Requires-Python", project["project"]["requires-python"]) in fields
    requires = [v for k, v in fields if k == "Requires-Dist"]
    assert requires == [f"{n}=={v}" for n, v in package.bootstrap_pins().items()]
    scripts = wheel.read(f"{info}/entry_points.txt").decode().splitlines()
    assert scripts[0] == "[console_scripts]"
    assert dict(line.split(" = ") for line in scripts[1:]) == project["project"]["scripts"]
    declared = project["tool"]["setuptools"]["packages"]
    assert list(package.PACKAGES) == [p for p in declared if "." not in p]  # + subpackages
    assert "Root-Is-Purelib: true" in wheel.read(f"{info}/WHEEL").decode()
    # the package data pyproject declares is in the wheel
    names = wheel.namelist()
    for pkg, globs in project["tool"]["setuptools"]["package-data"].items():
        for glob in globs:
            folder = pkg.replace(".", "/")
            found = [p for p in (ROOT / folder).glob(glob) if p.is_file()]
            in_wheel = [
                f"{folder}/{p.relative_to(ROOT / folder).as_posix()}" in names for p in found
            ]
            assert found and all(in_wheel), (pkg, glob)


def test_wheel_record_hashes_every_file():
    import base64
    import hashlib

    wheel = _wheel()
    info = "fruits_pipeline-0.1.0+0123456789ab.dist-info"
    rows = [line.split(",") for line in wheel.read(f"{info}/RECORD").decode().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(wheel.namelist())
    for name, digest, size in rows:
        if name == f"{info}/RECORD":
            assert (digest, size) == ("", "")
            continue
        data = wheel.read(name)
        b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (f"sha256={b64}", len(data)), name


def test_wheel_is_deterministic():
    assert package.build_wheel("0.1.0-abc") == package.build_wheel("0.1.0-abc")
    assert package.build_wheel("0.1.0-abc") != package.build_wheel("0.1.0-abd")


def test_wheel_is_importable_by_python(tmp_path):
    wpath = tmp_path / spec.wheel_name("0.1.0-abc")
    wpath.write_bytes(package.build_wheel("0.1.0-abc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(wpath)
    code = (
        "import cluster.spec, linalg, stages.base.errors; "
        "print(cluster.spec.__file__); print(stages.base.errors.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert all(wpath.name in line for line in lines), lines


def test_bundle_files_and_version():
    bundle = package.build_bundle()
    assert bundle.wheel == spec.wheel_name(bundle.version)
    assert set(bundle.files) == {
        bundle.wheel,
        "featurize.py",
        "reduce.py",
        "watch.py",
        "bootstrap-emr.sh",
        "requirements-emr.txt",
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+-[0-9a-f]{12}", bundle.version)
    assert bundle.version == package.build_bundle().version
    assert bundle.uri("fruits-eu") == f"s3://fruits-eu/code/{bundle.version}/"
    assert bundle.files["featurize.py"] == (ROOT / "stages" / "steps" / "featurize.py").read_bytes()
    assert b"stages.cli" in bundle.files["reduce.py"]
    assert b"stages.cli" in bundle.files["watch.py"]
    reqs = bundle.files["requirements-emr.txt"].decode().splitlines()
    assert reqs == [f"{n}=={v}" for n, v in package.bootstrap_pins().items()]


def test_content_version_changes_with_a_file_or_a_name():
    files = {"featurize.py": b"a", "reduce.py": b"b"}
    changed = {**files, "featurize.py": b"a\n# changed\n"}
    renamed = {"featurize.py": b"a", "xreduce.py": b"b"}
    versions = {package.content_version(f, "0.1.0") for f in (files, changed, renamed)}
    assert len(versions) == 3
    assert all(re.fullmatch(r"0\.1\.0-[0-9a-f]{12}", v) for v in versions)


def test_bundle_version_follows_the_packaged_code(monkeypatch, tmp_path):
    before = package.build_bundle(base_version="0.1.0")
    extra = tmp_path / "new_module.py"
    extra.write_text("X = 1\n")
    real = package.package_files
    monkeypatch.setattr(
        package, "package_files", lambda *a: [*real(*a), ("linalg/new_module.py", extra)]
    )
    after = package.build_bundle(base_version="0.1.0")
    assert after.version != before.version
    # the wheel carries the bundle's version and the changed code
    wheel = zipfile.ZipFile(io.BytesIO(after.files[after.wheel]))
    assert wheel.read("linalg/new_module.py") == b"X = 1\n"
    assert after.wheel == spec.wheel_name(after.version)


def test_emr_notebook_changes_only_the_kernel_and_the_parameters_cell():
    local = json.loads(package.notebook_path().read_text())
    emr = json.loads(package.emr_notebook("fruits-eu"))
    assert emr["metadata"]["kernelspec"] == {
        "name": "pysparkkernel",
        "display_name": "PySpark",
        "language": "python",
    }
    assert len(emr["cells"]) == len(local["cells"])
    changed = [i for i, (a, b) in enumerate(zip(local["cells"], emr["cells"])) if a != b]
    (params,) = changed
    assert "parameters" in emr["cells"][params]["metadata"]["tags"]
    source = "".join(emr["cells"][params]["source"])
    ns: dict = {}
    exec(source, ns)  # still plain Python assignments
    assert (ns["INPUT"], ns["FEATURES"], ns["RESULTS"], ns["WEIGHTS"]) == (
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Features/",
        "s3://fruits-eu/Results/",
        "imagenet",
    )
    before = "".join(local["cells"][params]["source"])
    assert ns["K"] == 10 and "# principal components kept" in source
    assert source.count("\n") == before.count("\n")


def test_emr_notebook_refuses_a_parameters_cell_it_cannot_fill():
    nb = json.loads(package.notebook_path().read_text())
    (params,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    params["source"] = ["INPUT = '../x'\n", "RESULTS = 'r'\n"]
    with pytest.raises(ValueError, match="does not assign a string to FEATURES"):
        package.emr_notebook("fruits-eu", json.dumps(nb).encode())
    params["metadata"]["tags"] = []
    with pytest.raises(ValueError, match="0 cells tagged 'parameters'"):
        package.emr_notebook("fruits-eu", json.dumps(nb).encode())


def test_notebook_path_outside_a_checkout_is_a_usage_error(monkeypatch, tmp_path):
    (tmp_path / "stages").mkdir()
    monkeypatch.setattr(package, "_package_dir", lambda name: tmp_path / name)
    with pytest.raises(UsageError, match="run `fruits-pipeline emr up --notebook` from a clone"):
        package.notebook_path()
