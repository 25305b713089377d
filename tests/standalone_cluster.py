"""A real Spark standalone cluster for tests: one master and N workers on 127.0.0.1,
each its own JVM started from the pyspark package, stopped with everything they spawned.

Only for tests (``tests/stages/test_standalone.py``); nothing here is imported by the package.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["StandaloneCluster", "free_port", "run_in_group", "spark_home", "stop_group"]


def spark_home() -> Path:
    """The pyspark package folder: it holds ``jars/`` and serves as ``SPARK_HOME``."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def scala_version() -> str:
    """The Scala binary version of the bundled Spark jars (``2.12`` for pyspark 3.5)."""
    for jar in (spark_home() / "jars").glob("spark-core_*.jar"):
        m = re.match(r"spark-core_(\d+\.\d+)-", jar.name)
        if m:
            return m.group(1)
    return "2.12"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``proc`` and every process in its process group (it was started with
    ``start_new_session=True``): SIGTERM, then SIGKILL after ``grace_s``."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None and pgid == proc.pid:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # Children (executors, Python workers) may outlive the leader: kill the group.
    if pgid is not None and pgid == proc.pid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=grace_s)


def run_in_group(
    cmd: Sequence[str], env: Dict[str, str], cwd: Path, timeout_s: float
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, capturing text output; on timeout the
    whole group is killed and :class:`subprocess.TimeoutExpired` raised."""
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=str(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace_s=5.0)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout_s, output=out, stderr=err) from None
    finally:
        if proc.poll() is None:  # an interrupt while waiting
            stop_group(proc, grace_s=5.0)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


@dataclass
class StandaloneCluster:
    """Master and workers as subprocesses; use as a context manager.

    Parameters
    ----------
    workdir : Path
        Logs (``master.log``, ``worker-N.log``) and the workers' ``--work-dir``
        (executor logs under ``worker-N/<app>/<executor>/``).
    n_workers, cores, memory : int, int, str
        Per worker: ``--cores`` and ``--memory``.
    daemon_heap : str
        ``-Xmx`` of the master and worker JVMs themselves (executors get
        ``spark.executor.memory``).
    """

    workdir: Path
    n_workers: int = 2
    cores: int = 1
    memory: str = "2g"
    daemon_heap: str = "256m"
    start_timeout_s: float = 90.0
    procs: List[subprocess.Popen] = field(default_factory=list)
    port: int = 0
    webui_port: int = 0

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(spark_home()),
            # The worker's launcher needs it to build an executor's command line; the
            # sbin scripts derive it from a source build, which the pip package is not.
            SPARK_SCALA_VERSION=scala_version(),
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_LOCAL_HOSTNAME="127.0.0.1",
            PYSPARK_PYTHON=sys.executable,
        )
        return env

    def _java(self, main: str, args: Sequence[str], log: Path) -> subprocess.Popen:
        java = (
            os.path.join(os.environ["JAVA_HOME"], "bin", "java")
            if "JAVA_HOME" in os.environ
            else "java"
        )
        cmd = [
            java,
            f"-Xmx{self.daemon_heap}",
            "-cp",
            str(spark_home() / "jars" / "*"),
            main,
            *args,
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd,
                env=self.env(),
                cwd=str(self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: teardown reaches its executors
            )
        self.procs.append(proc)
        return proc

    def state(self) -> Optional[dict]:
        """The master's ``/json/`` status, or None while it is not answering."""
        url = f"http://127.0.0.1:{self.webui_port}/json/"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def alive_workers(self) -> List[dict]:
        state = self.state() or {}
        return [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]

    def logs(self) -> str:
        """Tails of the daemons' logs (for assertion messages)."""
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"--- {log.name}\n{text[-3000:]}")
        return "\n".join(parts)

    def start(self) -> StandaloneCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.webui_port = free_port(), free_port()
        self._java(
            "org.apache.spark.deploy.master.Master",
            ["--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.webui_port)],
            self.workdir / "master.log",
        )
        for i in range(self.n_workers):
            work = self.workdir / f"worker-{i}"
            work.mkdir(exist_ok=True)
            self._java(
                "org.apache.spark.deploy.worker.Worker",
                [
                    "--host", "127.0.0.1",
                    "--webui-port", "0",
                    "--cores", str(self.cores),
                    "--memory", self.memory,
                    "--work-dir", str(work),
                    self.master_url,
                ],
                self.workdir / f"worker-{i}.log",
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a cluster daemon exited at start:\n{self.logs()}")
            if len(self.alive_workers()) == self.n_workers:
                return self
            time.sleep(0.5)
        raise RuntimeError(
            f"{self.n_workers} workers did not register with {self.master_url} "
            f"in {self.start_timeout_s:.0f} s:\n{self.logs()}"
        )

    def stop(self) -> None:
        # Workers first (they stop their executors), then the master.
        for proc in reversed(self.procs):
            stop_group(proc)
        self.procs.clear()

    def __enter__(self) -> StandaloneCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
