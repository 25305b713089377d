"""Graviton: the pins a node of each architecture installs, and PyPI's wheels for them.

The wheel check asks the real PyPI (``pip index versions``); where PyPI is unreachable
that test is skipped and says so.  The unreachable path itself is tested against a closed
local port.
"""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from cluster import package, wheels
from stages.base.errors import UsageError
from tests.conftest import needs_bash


def _pypi_unreachable() -> str:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return ""
    except OSError as exc:
        return f"PyPI unreachable from here ({exc}): the wheel check needs it"


def _bootstrap_pins_on(machine: str):
    """Run the bootstrap's PINS block as bash, ``uname -m`` answering ``machine``."""
    script = package.bootstrap_script()
    block = re.search(r"^PINS=\(.*?^fi\n", script, re.S | re.M).group(0)
    code = f'uname() {{ echo "{machine}"; }}\n{block}printf "%s\\n" "${{PINS[@]}}"\n'
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True)
    return dict(line.split("==") for line in out.stdout.split())


@needs_bash
@pytest.mark.parametrize("machine, arch", [("x86_64", "x86_64"), ("aarch64", "aarch64")])
def test_the_bootstrap_installs_what_the_wheel_check_checks(machine, arch):
    assert _bootstrap_pins_on(machine) == package.bootstrap_pins(arch=arch)


def test_aarch64_nodes_get_the_same_versions_with_tensorflow_for_tensorflow_cpu():
    x86, arm = package.bootstrap_pins(), package.bootstrap_pins(arch="aarch64")
    assert arm.pop("tensorflow") == x86.pop("tensorflow-cpu")
    assert arm == x86


def test_platform_tags_reach_back_from_the_nodes_glibc():
    tags = wheels.platform_tags("aarch64")
    assert tags[0] == "manylinux_2_34_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_27_aarch64" in tags  # ai-edge-litert 2.3.0's wheel tag
    assert "manylinux_2_35_aarch64" not in tags  # newer than Amazon Linux 2023's glibc


@pytest.mark.cluster  # pip processes asking PyPI
def test_tensorflow_cpu_has_no_aarch64_wheel_and_is_named_first():
    reason = _pypi_unreachable()
    if reason:
        pytest.skip(reason)
    x86 = package.bootstrap_pins()
    first_two = dict(list(x86.items())[:2])  # tensorflow-cpu, ai-edge-litert
    result = wheels.check_wheels(first_two, "aarch64")
    if result.unreachable:
        pytest.skip("PyPI did not answer pip: " + str(result.results))
    assert result.missing == ["tensorflow-cpu"], result.results
    assert result.results["ai-edge-litert"] == ("ok", "2.3.0")  # the README was wrong
    with pytest.raises(UsageError, match=r"no aarch64 wheel of tensorflow-cpu==2\.21\.0"):
        result.verdict()  # names the first pin without a wheel


@pytest.mark.cluster  # two pip processes
def test_an_unreachable_index_is_a_warning_not_a_verdict(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    warning = wheels.require_wheels({"numpy": "1.26.4"}, "aarch64", timeout=2)
    assert warning and "not checked" in warning and "PyPI did not answer" in warning
