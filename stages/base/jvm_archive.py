"""A class-data archive for the local JVM (AppCDS): Spark's classes mapped, not loaded again.

A local run starts its own JVM, and loading, parsing and verifying Spark's classes is a
large part of that JVM's CPU in a run of a few thousand photos (benchmarks/README.md,
section 1).  Java 17 can write the classes a JVM loaded to a *dynamic archive*
when it exits (``-XX:ArchiveClassesAtExit``) and map them at the next start
(``-XX:SharedArchiveFile``).  Here:

- The archive's name is a digest of what decides whether a JVM can map it: the JDK (17 or
  later: its ``release``, ``modules`` image and ``libjvm``), Spark's jars, the class path
  settings and the driver heap (compressed oops).  A change of any of them names a new
  archive.
- The first command that finds none dumps one.  Its JVM writes the archive when it exits
  (after the command's own exit, which ends it), to a part file; a small detached process
  waits for that JVM to be gone and only then moves the file into place if the JVM's log
  says it was written, synced to disk (:func:`finish_archive`, :func:`promote`): a JVM
  never maps a half-written archive (one that is truncated crashes it with SIGBUS), and
  the command does not wait for the dump.  A dump that failed is tried again after a day.
- One dump at a time (a lock file holding the dumper's, then the waiter's pid); a stale
  lock or part file is removed by the next command.
- The JVM's CDS log lines stay off the console: an archive it cannot use (another class
  path) is ignored with no line, and the run goes on without it.
- ``FRUITS_JVM_CDS=0`` turns it off.  Under ``spark-submit`` (EMR) nothing changes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional

logger = logging.getLogger(__name__)

__all__ = ["ArchiveDump", "archive_options", "finish_archive", "pending_dump", "promote"]

# Bump when what goes into the key changes.
_FORMAT = 1
# Archives kept in the cache (130-200 MB each for Spark 3.5): the most recently used.
_KEEP = 2
# How long the waiter waits for the JVM to write the archive and exit.
_DUMP_WAIT_S = 120.0
_LOG_SUCCESS = "Written dynamic archive"
MIN_JAVA = 17
# A dump whose JVM said it failed is tried again after a day (a full disk passes).
FAILED_RETRY_S = 86_400.0
# Paths the options carry as they are: Spark splits its options on spaces (quotes aside),
# and -Xlog's file= ends at a ':' or ','.
_SAFE_PATH = re.compile(r"[\w./+-]+")
# The JVM's CDS lines (a mismatched or missing archive) would reach the console.
_QUIET = ["-Xlog:cds=off", "-Xlog:cds+dynamic=off"]


@dataclass
class ArchiveDump:
    """A dump in progress: the part file the JVM writes at its exit, its log, the final
    name, the failure marker and the lock this process holds."""

    part: Path
    log: Path
    final: Path
    failed: Path
    lock: Path


_PENDING: Optional[ArchiveDump] = None


def pending_dump() -> Optional[ArchiveDump]:
    """The dump this process's JVM will write at its exit, or None."""
    return _PENDING


def _enabled() -> bool:
    return os.environ.get("FRUITS_JVM_CDS", "1").strip() != "0"


def _java_home() -> Optional[Path]:
    """The JDK spark-class runs: ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.path.exists(java):
        return None
    return Path(os.path.realpath(java)).parent.parent


def java_major(home: Path) -> int:
    """The JDK's major version from its ``release`` file (``JAVA_VERSION="17.0.15"``,
    ``"1.8.0_392"``), 0 when it says none."""
    try:
        text = (home / "release").read_text(errors="replace")
    except OSError:
        return 0
    found = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.M)
    if not found:
        return 0
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def _stat(path: Path) -> List[int]:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def archive_key(conf: Mapping[str, str], memory: str) -> Optional[str]:
    """The digest naming the archive this JVM could map, or None (no JDK or Spark found)."""
    from pyspark.find_spark_home import _find_spark_home

    home = _java_home()
    # -XX:ArchiveClassesAtExit came with JDK 13; a JVM that does not know an option does
    # not start.  17 is what this was measured and tested with (EMR 7's too).
    if home is None or java_major(home) < MIN_JAVA:
        return None
    try:
        libjvm = next((home / "lib" / "server").glob("libjvm.*"))
        jdk = [_stat(home / "release"), _stat(home / "lib" / "modules"), _stat(libjvm)]
        jars_dir = Path(_find_spark_home()) / "jars"
        jars = sorted((p.name, *_stat(p)) for p in jars_dir.glob("*.jar"))
    except (OSError, StopIteration):
        return None
    if not jars:
        return None
    parts = {
        "format": _FORMAT,
        "jdk": [str(home), jdk],
        "jars": jars,
        "class_path": conf.get("spark.driver.extraClassPath", ""),
        # The launcher adds these folders to the class path.
        "env": [os.environ.get(v, "") for v in _CLASS_PATH_ENV],
        "memory": memory,
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_CLASS_PATH_ENV = ("SPARK_CONF_DIR", "HADOOP_CONF_DIR", "YARN_CONF_DIR", "SPARK_DIST_CLASSPATH")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: under a parent that never reaps, a JVM
    that has exited stays one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _take_lock(lock: Path) -> bool:
    """Create ``lock`` holding our pid; a lock whose process is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and _alive(holder):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def _remove_stale_parts(folder: Path, key: str) -> None:
    """Part files and logs of ``key``'s dumps whose command is gone (killed, or failed)."""
    for name in glob.glob(str(folder / f"spark-{key}.*part-*")):
        try:
            pid = int(name.rsplit("-", 1)[1].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            Path(name).unlink(missing_ok=True)


def archive_options(cache: Path, conf: Mapping[str, str], memory: str) -> List[str]:
    """JVM options for the archive of this JVM: map it, or dump it at exit.

    Parameters
    ----------
    cache : Path
        The tool's cache folder (archives go to ``cache/jvm``).
    conf : mapping
        The session's settings (their class path).
    memory : str
        The driver heap (``spark.driver.memory``).

    Returns
    -------
    list of str
        Options for ``spark.driver.extraJavaOptions``; empty when off or impossible.
    """
    global _PENDING
    if not _enabled():
        return []
    key = archive_key(conf, memory)
    if key is None:
        return []
    folder = (cache / "jvm").absolute()
    if not _SAFE_PATH.fullmatch(str(folder)):
        logger.debug("jvm: no class archive under %s (a character JVM options cannot hold)", folder)
        return []
    final = folder / f"spark-{key}.jsa"
    if final.exists():
        try:
            os.utime(final)  # the newest used are kept
        except OSError:
            pass
        return [*_QUIET, f'"-XX:SharedArchiveFile={final}"']
    failed = folder / f"spark-{key}.failed"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if failed.exists() and time.time() - failed.stat().st_mtime < FAILED_RETRY_S:
            return []
        lock = folder / f"spark-{key}.lock"
        if not _take_lock(lock):
            return []  # another command is dumping it, or its waiter promoting it
        # Only with the lock: a part whose command is gone may still be being written by
        # its JVM, for its waiter (who holds the lock until it is done).
        _remove_stale_parts(folder, key)
    except OSError:
        return []  # an unwritable cache must not stop the run
    pid = os.getpid()
    _PENDING = ArchiveDump(
        part=folder / f"spark-{key}.jsa.part-{pid}",
        log=folder / f"spark-{key}.part-{pid}.log",
        final=final,
        failed=failed,
        lock=lock,
    )
    logger.debug("jvm: this run writes the class archive %s at its end", final)
    return [
        *_QUIET,
        f'"-Xlog:cds+dynamic=info:file={_PENDING.log}"',
        f'"-XX:ArchiveClassesAtExit={_PENDING.part}"',
    ]


def finish_archive() -> None:
    """After a command that succeeded: hand the dump over to a detached process that
    waits for the JVM's exit (the command's own exit ends it) and moves the archive
    into place, so the command does not wait for the dump.  Nothing when this run
    dumps none."""
    global _PENDING
    dump, _PENDING = _PENDING, None
    if dump is None:
        return
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is None:
        return
    args = [str(proc.pid), str(dump.part), str(dump.log), str(dump.final), str(dump.failed)]
    try:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "stages.base.jvm_archive", *args, str(dump.lock)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives this command, and its Ctrl-C
        )
        # The waiter holds the lock now (replaced whole: never seen empty).
        tmp = dump.lock.with_name(f"{dump.lock.name}.{os.getpid()}")
        tmp.write_text(str(waiter.pid))
        os.replace(tmp, dump.lock)
    except OSError as exc:
        logger.debug("jvm: class archive not kept: %s", exc)


def promote(jvm_pid: int, dump: ArchiveDump, wait_s: float = _DUMP_WAIT_S) -> bool:
    """Wait for the dumping JVM to be gone, then move its archive into place if its log
    says it was written (else remember the failure).  Returns whether it was kept."""
    deadline = time.monotonic() + wait_s
    while _alive(jvm_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        if _alive(jvm_pid):
            return False  # still writing: the part is removed by a later command
        if not dump.part.exists():
            return False  # nothing was written (the JVM never reached its exit)
        if _LOG_SUCCESS not in _read(dump.log):
            dump.failed.touch()  # tried again after FAILED_RETRY_S
            return False
        # On disk before its name: a truncated archive after a power cut would crash
        # every JVM that maps it.
        with open(dump.part, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(dump.part, dump.final)
        _fsync_folder(dump.final.parent)
        _keep_newest(dump.final.parent)
        return True
    except OSError:
        return False
    finally:
        dump.part.unlink(missing_ok=True)
        dump.log.unlink(missing_ok=True)
        dump.lock.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _keep_newest(folder: Path) -> None:
    archives = sorted(folder.glob("spark-*.jsa"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[_KEEP:]:
        old.unlink(missing_ok=True)


if __name__ == "__main__":  # the waiter started by finish_archive
    pid, part, log, final, failed, lock = sys.argv[1:7]
    dump = ArchiveDump(Path(part), Path(log), Path(final), Path(failed), Path(lock))
    sys.exit(0 if promote(int(pid), dump) else 1)
