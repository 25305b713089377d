"""The code an EMR cluster runs: the project's wheel, the stage scripts, the bootstrap.

:func:`build_bundle` makes every file in memory and names the version after their
content (``0.1.0-<sha256[:12]>``), so the same code gives the same
``s3://B/code/<version>/`` and a changed file never overwrites what a running
cluster uses.  :func:`upload_bundle` puts the files there.  The bootstrap installs the
wheel (``pip install``) into every node's Python 3.11, where steps, Livy sessions and
notebook kernels import it.

:func:`emr_notebook` is ``notebooks/fruits_pipeline.ipynb`` made ready for the
cluster (PySpark kernel, the bucket's paths in its parameters cell);
:func:`upload_notebook` puts it where JupyterHub's default user finds it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import stages
from cluster.spec import (
    BOOTSTRAP_NAME,
    DIST_NAME,
    NOTEBOOK_NAME,
    REQUIREMENTS_NAME,
    STAGE_SCRIPTS,
    code_uri,
    notebook_key,
    wheel_name,
)
from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "AARCH64_NAMES",
    "ENTRY_POINTS",
    "PACKAGES",
    "Bundle",
    "bootstrap_pins",
    "bootstrap_script",
    "build_bundle",
    "build_wheel",
    "content_version",
    "emr_notebook",
    "notebook_path",
    "package_files",
    "requirements_text",
    "upload_bundle",
    "upload_notebook",
]

PACKAGES: Tuple[str, ...] = ("stages", "linalg", "cluster")
# pyproject.toml's [project.scripts] (tests/cluster/test_package.py checks that they agree).
ENTRY_POINTS: Dict[str, str] = {"fruits-pipeline": "stages.cli:main"}
REQUIRES_PYTHON = ">=3.9"
SUMMARY = "Fruits! image pipeline: MobileNetV2 features on Spark, then a distributed PCA."
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
# 1980-01-01, the zip epoch: the same files always give the same bytes (and version).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# What the bootstrap installs instead on aarch64 (Graviton) nodes, same version.
AARCH64_NAMES: Dict[str, str] = {"tensorflow-cpu": "tensorflow"}
_PIN_RE = re.compile(r"[\"']?([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)[\"']?")


@dataclass(frozen=True)
class Bundle:
    """Files for ``s3://B/code/<version>/``: name -> bytes."""

    files: Dict[str, bytes]
    version: str

    def uri(self, bucket: str) -> str:
        """``s3://bucket/code/<version>/``."""
        return code_uri(bucket, self.version)

    @property
    def wheel(self) -> str:
        """The wheel's file name (:func:`cluster.spec.wheel_name`)."""
        return wheel_name(self.version)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {name} not found: run from the project or install it")
    return Path(list(spec.submodule_search_locations)[0])


def package_files(packages: Sequence[str] = PACKAGES) -> Iterator[Tuple[str, Path]]:
    """``(name in the zip, file)`` for every file of ``packages``, data included, sorted."""
    for pkg in packages:
        root = _package_dir(pkg)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if (
                not path.is_file()
                or any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts)
                or path.suffix in _SKIP_SUFFIXES
            ):
                continue
            yield f"{pkg}/{rel.as_posix()}", path


def _zip_entry(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def build_wheel(
    version: str,
    sources: Optional[Dict[str, bytes]] = None,
    requires: Optional[Dict[str, str]] = None,
) -> bytes:
    """The project as a pure-Python wheel, built in memory (no setuptools, no checkout).

    The same files as pyproject.toml's packages and package data; metadata from the
    constants above.  ``Requires-Dist`` lists the bootstrap's exact pins, what the
    nodes run it with (pyspark is EMR's own, on Spark's ``PYTHONPATH``, so it is not
    listed and the bootstrap installs with ``--no-deps``).  Same files, same bytes.

    Parameters
    ----------
    version : str
        Code version ``0.1.0-<sha>`` (:func:`content_version`); the wheel's is
        ``0.1.0+<sha>``.
    sources : dict, optional
        ``{path in the wheel: bytes}``; default :func:`package_files`.
    requires : dict, optional
        ``{name: version}``; default :func:`bootstrap_pins`.
    """
    if sources is None:
        sources = {name: path.read_bytes() for name, path in package_files()}
    requires = bootstrap_pins() if requires is None else requires
    filename = wheel_name(version)
    dist, wheel_version = filename.split("-")[:2]
    info_dir = f"{dist}-{wheel_version}.dist-info"
    metadata = "".join(
        [
            "Metadata-Version: 2.1\n",
            f"Name: {DIST_NAME}\n",
            f"Version: {wheel_version}\n",
            f"Summary: {SUMMARY}\n",
            "License: Apache-2.0\n",
            f"Requires-Python: {REQUIRES_PYTHON}\n",
            *(f"Requires-Dist: {name}=={pin}\n" for name, pin in requires.items()),
        ]
    )
    wheel_meta = (
        "Wheel-Version: 1.0\nGenerator: fruits-pipeline cluster/package.py\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    scripts = "".join(f"{name} = {target}\n" for name, target in ENTRY_POINTS.items())
    files = dict(sorted(sources.items()))
    files[f"{info_dir}/METADATA"] = metadata.encode("utf-8")
    files[f"{info_dir}/WHEEL"] = wheel_meta.encode("utf-8")
    files[f"{info_dir}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    files[f"{info_dir}/top_level.txt"] = "".join(p + "\n" for p in PACKAGES).encode("utf-8")
    record = "".join(f"{n},{_record_hash(b)},{len(b)}\n" for n, b in files.items())
    record += f"{info_dir}/RECORD,,\n"
    files[f"{info_dir}/RECORD"] = record.encode("utf-8")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            _zip_entry(zf, name, data)
    return buf.getvalue()


def bootstrap_script() -> str:
    """The text of ``cluster/bootstrap-emr.sh``."""
    return Path(__file__).with_name(BOOTSTRAP_NAME).read_text(encoding="utf-8")


def bootstrap_pins(script: Optional[str] = None, arch: str = "x86_64") -> Dict[str, str]:
    """``{package: version}`` of the ``NAME==VERSION`` pins in the bootstrap's ``PINS``.

    ``arch="aarch64"``: what a Graviton node installs (:data:`AARCH64_NAMES`).
    """
    text = bootstrap_script() if script is None else script
    m = re.search(r"^PINS=\((.*?)^\)", text, re.S | re.M)
    if not m:
        raise ValueError("bootstrap-emr.sh has no PINS=( ... ) array")
    names = AARCH64_NAMES if arch == "aarch64" else {}
    return {names.get(name, name): version for name, version in _PIN_RE.findall(m.group(1))}


def requirements_text(pins: Optional[Dict[str, str]] = None) -> str:
    """``requirements-emr.txt``: the bootstrap's pins, one a line (for a local replica)."""
    pins = bootstrap_pins() if pins is None else pins
    return "".join(f"{name}=={version}\n" for name, version in pins.items())


def build_bundle(base_version: Optional[str] = None) -> Bundle:
    """Every file of ``s3://B/code/<version>/``, and the version named after them.

    The version hashes the project's files and the scripts; the wheel is made from
    those files after, with that version inside it.
    """
    if base_version is None:
        base_version = stages.__version__
    stages_dir = _package_dir("stages")
    files: Dict[str, bytes] = {}
    for stage, script in STAGE_SCRIPTS.items():
        src = stages_dir / "steps" / f"{stage}.py"
        if not src.is_file():
            raise UsageError(f"stage script {src} is missing: the EMR step needs it")
        files[script] = src.read_bytes()
    files[BOOTSTRAP_NAME] = bootstrap_script().encode("utf-8")
    files[REQUIREMENTS_NAME] = requirements_text().encode("utf-8")
    sources = {name: path.read_bytes() for name, path in package_files()}
    version = content_version(
        {**files, **{"wheel/" + n: b for n, b in sources.items()}}, base_version
    )
    files[wheel_name(version)] = build_wheel(version, sources)
    return Bundle(files=files, version=version)


def content_version(files: Dict[str, bytes], base_version: str) -> str:
    """``<base_version>-<first 12 hex of a SHA-256 over the names and contents>``."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(files[name]).digest())
    return f"{base_version}-{digest.hexdigest()[:12]}"


def upload_bundle(s3_client, bucket: str, bundle: Bundle) -> str:
    """Put the bundle's files under ``s3://bucket/code/<version>/``; return that URI."""
    uri = bundle.uri(bucket)
    prefix = uri[len(f"s3://{bucket}/") :]
    for name in sorted(bundle.files):
        s3_client.put_object(Bucket=bucket, Key=prefix + name, Body=bundle.files[name])
    total = sum(len(b) for b in bundle.files.values())
    logger.info(f"emr: uploaded {len(bundle.files)} files ({total / 1e6:.1f} MB) to {uri}")
    return uri


def notebook_path() -> Path:
    """``notebooks/fruits_pipeline.ipynb`` of the project checkout.

    Raises
    ------
    UsageError
        The project is installed without its checkout (the notebook is not package data).
    """
    path = _package_dir("stages").parent / "notebooks" / NOTEBOOK_NAME
    if not path.is_file():
        raise UsageError(
            f"--notebook uploads notebooks/{NOTEBOOK_NAME}, not found at {path}: run "
            "`fruits-pipeline emr up --notebook` from a clone of the project"
        )
    return path


# The parameters the cluster's copy gets: the bucket's conventional folders, and the
# Keras ImageNet weights (alpha 1.0) that the steps use by default on EMR.
_EMR_PARAMETERS = {
    "INPUT": "s3://{bucket}/Test/",
    "FEATURES": "s3://{bucket}/Features/",
    "RESULTS": "s3://{bucket}/Results/",
    "WEIGHTS": "imagenet",
}
PYSPARK_KERNEL = {"name": "pysparkkernel", "display_name": "PySpark", "language": "python"}


def emr_notebook(bucket: str, source: Optional[bytes] = None) -> bytes:
    """The notebook as JupyterHub on the cluster should open it.

    Only two things change: the kernel (sparkmagic's PySpark, whose cells run in a
    Livy session on the cluster) and, in the parameters cell (the cell tagged
    ``parameters``, the only one a user edits), ``INPUT``, ``FEATURES``, ``RESULTS``
    and ``WEIGHTS``.  Every other cell is the local notebook's, byte for byte.

    Raises
    ------
    ValueError
        No parameters cell, or one of those names is not assigned a string in it.
    """
    nb = json.loads(notebook_path().read_bytes() if source is None else source)
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"the notebook has {len(cells)} cells tagged 'parameters', not 1")
    cell = cells[0]
    text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    for name, value in _EMR_PARAMETERS.items():
        pattern = re.compile(rf"^({name} = )(\"[^\"\n]*\"|'[^'\n]*')", re.M)
        if not pattern.search(text):
            raise ValueError(f"the parameters cell does not assign a string to {name}")
        new = json.dumps(value.format(bucket=bucket))
        text = pattern.sub(lambda m, new=new: m.group(1) + new, text, count=1)
    cell["source"] = text.splitlines(keepends=True)
    nb.setdefault("metadata", {})["kernelspec"] = dict(PYSPARK_KERNEL)
    return (json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def upload_notebook(s3_client, bucket: str, notebook: bytes) -> str:
    """Put ``notebook`` (:func:`emr_notebook`) at ``s3://bucket/jupyter/jovyan/``; return its URI.

    An existing copy is left alone: it may hold a user's edits and outputs, which
    JupyterHub saved there from an earlier cluster.
    """
    key = notebook_key()
    uri = f"s3://{bucket}/{key}"
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    if any(o["Key"] == key for o in resp.get("Contents", [])):
        logger.info(f"emr: {uri} exists (JupyterHub saved it): left as it is")
        return uri
    s3_client.put_object(Bucket=bucket, Key=key, Body=notebook)
    logger.info(f"emr: notebook uploaded to {uri}")
    return uri
