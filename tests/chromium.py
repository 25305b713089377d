"""Headless Chromium for the browser tests (the report's page and the similarity app).

``/usr/bin/chromium`` is Debian's wrapper script: the browser is its child, with its
own children (zygotes, renderers, the network and storage services).  Waiting for the
wrapper is not waiting for the browser, which goes on writing its profile while it shuts
down; removing the profile then fails ("Directory not empty").  So each Chromium runs
in a process group of its own, and its profile is removed only once no process of that
group is alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import psutil
import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)


def _alive(pgid: int) -> List[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


class Chromium:
    """One Chromium process group with a temporary profile.

    Parameters
    ----------
    args : sequence of str
        Arguments after the common :data:`FLAGS` and ``--user-data-dir``.
    """

    def __init__(self, args: Sequence[str], capture: bool = False) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self.profile = Path(self._profile.name)
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={self.profile}", *args],
            stdout=out,
            stderr=out,
            text=True,
            start_new_session=True,  # its own group: every process it starts is found
        )

    def communicate(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for a one-shot run (``--dump-dom``, ``--screenshot``) and its output."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.close()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def close(self, grace: float = 15.0) -> None:
        """Stop every process of the group (SIGTERM, then SIGKILL after ``grace`` s),
        wait until none is alive, then remove the profile."""
        pgid = self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while _alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pgid):
                break
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        left: Optional[List[psutil.Process]] = _alive(pgid)
        assert not left, f"chromium processes outlived SIGKILL: {left}"
        self._profile.cleanup()
