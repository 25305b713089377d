"""Does every pinned library have a wheel for the nodes' architecture? Asked of PyPI by pip.

The nodes install binary wheels only (no compiler on an EMR node, and building TensorFlow
would take hours), for CPython 3.11 on Amazon Linux 2023 (glibc 2.34): a wheel tagged
``manylinux_2_X`` for any X <= 34 (or ``manylinux2014``) installs there.  pip's
``--platform`` does not expand one tag into the older ones (``manylinux_2_34_aarch64``
alone does not match ``ai_edge_litert-2.3.0-...-manylinux_2_27_aarch64.whl``), so
:func:`platform_tags` lists them all.

``pip index versions NAME`` with those target options lists the versions of NAME that
have such a wheel, from the index page alone: no download (``pip install --dry-run``
fetches each wheel whole, 282 MB for TensorFlow on aarch64).  The local pip
configuration is ignored (``PIP_CONFIG_FILE=/dev/null``): the nodes use PyPI, not this
machine's mirrors or constraints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from stages.base.errors import UsageError

__all__ = [
    "NODE_GLIBC",
    "NODE_PYTHON",
    "WheelCheck",
    "check_wheels",
    "platform_tags",
    "require_wheels",
    "summary",
]

NODE_GLIBC = (2, 34)  # Amazon Linux 2023, EMR 7.x
NODE_PYTHON = "3.11"
# pip itself has a py3-none-any wheel for every platform: when the index lists none of
# its versions, the index did not answer (pip says only "No matching distribution").
_CONTROL = "pip"


def platform_tags(arch: str, glibc: Tuple[int, int] = NODE_GLIBC) -> List[str]:
    """Every manylinux tag a node with ``glibc`` installs, newest first."""
    tags = [f"manylinux_2_{m}_{arch}" for m in range(glibc[1], 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


class WheelCheck:
    """The outcome for each pin: ``missing`` (no such wheel), ``unreachable`` (no answer)."""

    def __init__(self, arch: str, results: Dict[str, Tuple[str, str]]):
        self.arch = arch
        self.results = results  # name -> (state: ok|missing|unreachable, detail)

    @property
    def missing(self) -> List[str]:
        """Pins without a wheel, in the pins' order."""
        return [n for n, (state, _) in self.results.items() if state == "missing"]

    @property
    def unreachable(self) -> bool:
        """Whether the index did not answer for some pin."""
        return any(state == "unreachable" for state, _ in self.results.values())

    def verdict(self) -> Optional[str]:
        """Raise if a pin has no wheel; return a warning if some could not be checked.

        Raises
        ------
        UsageError
            Naming the first pin (in the bootstrap's order) that has no wheel.
        """
        if self.missing:
            raise UsageError(
                f"{self.results[self.missing[0]][1]}: the bootstrap would fail on every "
                f"{self.arch} node; choose an x86_64 --instance-type (m5, c5, r5)"
            )
        if self.unreachable:
            detail = next(d for s, d in self.results.values() if s == "unreachable")
            return f"wheels for {self.arch} not checked ({detail})"
        return None


def _versions(name: str, arch: str, python: str, timeout: float) -> Optional[List[str]]:
    """Versions of ``name`` with a wheel for the target; None when pip could not run."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp", "--disable-pip-version-check"]
    for tag in platform_tags(arch):
        cmd += ["--platform", tag]
    cmd += ["--timeout", str(int(timeout)), "--retries", "1"]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout * 3)
    except subprocess.TimeoutExpired:
        return None
    if "No module named pip" in proc.stderr:
        return None
    m = re.search(r"Available versions:\s*(.+)", proc.stdout)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def _pip_index(name: str, version: str, arch: str, python: str, timeout: float) -> Tuple[str, str]:
    versions = _versions(name, arch, python, timeout)
    if versions is None:
        return "unreachable", f"pip (`{sys.executable} -m pip`) gave no answer"
    if version in versions:
        return "ok", version
    newest = f"; {arch} wheels exist for {', '.join(versions[:3])}" if versions else ""
    return "missing", f"no {arch} wheel of {name}=={version} for CPython {python}{newest}"


def check_wheels(
    pins: Dict[str, str], arch: str, python: str = NODE_PYTHON, timeout: float = 15.0
) -> WheelCheck:
    """Ask the package index, for every pin at once (in threads), whether its wheel exists."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(pins) + 1))) as pool:
        control = pool.submit(_versions, _CONTROL, arch, python, timeout)
        futures = {
            name: pool.submit(_pip_index, name, version, arch, python, timeout)
            for name, version in pins.items()
        }
        results = {name: f.result() for name, f in futures.items()}
    if not control.result():
        why = "PyPI did not answer (offline, or a proxy in the way)"
        results = {name: ("unreachable", why) for name in results}
    return WheelCheck(arch, results)


def require_wheels(
    pins: Dict[str, str], arch: str, python: str = NODE_PYTHON, timeout: float = 15.0
) -> Optional[str]:
    """:func:`check_wheels`, then :meth:`WheelCheck.verdict`."""
    return check_wheels(pins, arch, python, timeout).verdict()


def summary(pins: Sequence[str], arch: str) -> str:
    """One line: what was checked."""
    return f"every pinned library has a CPython {NODE_PYTHON} {arch} wheel: {', '.join(pins)}"
