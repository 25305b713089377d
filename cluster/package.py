"""The code an EMR cluster runs: one zip for ``--py-files``, the stage scripts, the bootstrap.

:func:`build_bundle` makes every file in memory and names the version after their
content (``0.1.0-<sha256[:12]>``), so the same code gives the same
``s3://B/code/<version>/`` and a changed file never overwrites what a running
cluster uses.  :func:`upload_bundle` puts the files there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from cluster.spec import BOOTSTRAP_NAME, REQUIREMENTS_NAME, STAGE_SCRIPTS, ZIP_NAME, code_uri
from stages.errors import UsageError

__all__ = [
    "PACKAGES",
    "Bundle",
    "bootstrap_pins",
    "bootstrap_script",
    "build_bundle",
    "build_zip",
    "content_version",
    "package_files",
    "requirements_text",
    "upload_bundle",
]

PACKAGES: Tuple[str, ...] = ("stages", "linalg", "cluster")
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
# 1980-01-01, the zip epoch: the same files always give the same bytes (and version).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_PIN_RE = re.compile(r"[\"']?([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)[\"']?")


@dataclass(frozen=True)
class Bundle:
    """Files for ``s3://B/code/<version>/``: name -> bytes."""

    files: Dict[str, bytes]
    version: str

    def uri(self, bucket: str) -> str:
        """``s3://bucket/code/<version>/``."""
        return code_uri(bucket, self.version)


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


def build_zip(packages: Sequence[str] = PACKAGES) -> bytes:
    """``fruits_pipeline.zip``: the packages with their data (weights, log4j2, bootstrap)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in package_files(packages):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def bootstrap_script() -> str:
    """The text of ``cluster/bootstrap-emr.sh``."""
    return Path(__file__).with_name(BOOTSTRAP_NAME).read_text(encoding="utf-8")


def bootstrap_pins(script: Optional[str] = None) -> Dict[str, str]:
    """``{package: version}`` of the ``NAME==VERSION`` pins in the bootstrap's ``PINS``."""
    text = bootstrap_script() if script is None else script
    m = re.search(r"^PINS=\((.*?)^\)", text, re.S | re.M)
    if not m:
        raise ValueError("bootstrap-emr.sh has no PINS=( ... ) array")
    return {name: version for name, version in _PIN_RE.findall(m.group(1))}


def requirements_text(pins: Optional[Dict[str, str]] = None) -> str:
    """``requirements-emr.txt``: the bootstrap's pins, one a line (for a local replica)."""
    pins = bootstrap_pins() if pins is None else pins
    return "".join(f"{name}=={version}\n" for name, version in pins.items())


def build_bundle(base_version: Optional[str] = None) -> Bundle:
    """Every file of ``s3://B/code/<version>/``, and the version named after them."""
    if base_version is None:
        import stages

        base_version = stages.__version__
    stages_dir = _package_dir("stages")
    files: Dict[str, bytes] = {ZIP_NAME: build_zip()}
    for stage, script in STAGE_SCRIPTS.items():
        src = stages_dir / f"{stage}.py"
        if not src.is_file():
            raise UsageError(f"stage script {src} is missing: the EMR step needs it")
        files[script] = src.read_bytes()
    files[BOOTSTRAP_NAME] = bootstrap_script().encode("utf-8")
    files[REQUIREMENTS_NAME] = requirements_text().encode("utf-8")
    return Bundle(files=files, version=content_version(files, base_version))


def content_version(files: Dict[str, bytes], base_version: str) -> str:
    """``<base_version>-<first 12 hex of a SHA-256 over the names and contents>``."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(files[name]).digest())
    return f"{base_version}-{digest.hexdigest()[:12]}"


def upload_bundle(
    s3_client, bucket: str, bundle: Bundle, log: Optional[Callable[[str], None]] = None
) -> str:
    """Put the bundle's files under ``s3://bucket/code/<version>/``; return that URI."""
    log = log or (lambda msg: None)
    uri = bundle.uri(bucket)
    prefix = uri[len(f"s3://{bucket}/") :]
    for name in sorted(bundle.files):
        s3_client.put_object(Bucket=bucket, Key=prefix + name, Body=bundle.files[name])
    total = sum(len(b) for b in bundle.files.values())
    log(f"emr: uploaded {len(bundle.files)} files ({total / 1e6:.1f} MB) to {uri}")
    return uri
