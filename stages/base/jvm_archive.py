"""A class-data archive for the local JVM (AppCDS): Spark's classes mapped, not loaded again.

A local run starts its own JVM, and loading, parsing and verifying Spark's classes is a
large part of that JVM's CPU in a run of a few thousand photos (benchmarks/README.md,
"Where the CPU goes").  Java 17 can write the classes a JVM loaded to a *dynamic archive*
when it exits (``-XX:ArchiveClassesAtExit``) and map them at the next start
(``-XX:SharedArchiveFile``).  Here:

- The archive's name is a digest of what decides whether a JVM can map it: the JDK (its
  ``modules`` image and ``libjvm.so``), Spark's jars, the class path settings and the
  driver heap (compressed oops).  A change of any of them names a new archive.
- The first command that finds none dumps one.  Its JVM writes the archive when it exits,
  so that command stops Spark at its end, waits for the exit and only then moves the file
  into place (:func:`finish_archive`): a JVM never maps a half-written archive (one that
  is truncated crashes it with SIGBUS).  The JVM's own log says whether the dump was
  written; a dump that failed is remembered and not tried again.
- One dump at a time (a lock file holding the dumper's pid); a stale lock or part file is
  removed by the next command.
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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional

logger = logging.getLogger(__name__)

__all__ = ["ArchiveDump", "archive_options", "finish_archive", "pending_dump"]

# Bump when what goes into the key changes.
_FORMAT = 1
# Archives kept in the cache (each about 130 MB for Spark 3.5): the newest used.
_KEEP = 2
# How long a command waits for its JVM to write the archive and exit.
_DUMP_WAIT_S = 120.0
_LOG_SUCCESS = "Written dynamic archive"
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


def _stat(path: Path) -> List[int]:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def archive_key(conf: Mapping[str, str], memory: str) -> Optional[str]:
    """The digest naming the archive this JVM could map, or None (no JDK or Spark found)."""
    from pyspark.find_spark_home import _find_spark_home

    home = _java_home()
    if home is None:
        return None
    try:
        jdk = [_stat(home / "lib" / "modules"), _stat(home / "lib" / "server" / "libjvm.so")]
        jars_dir = Path(_find_spark_home()) / "jars"
        jars = sorted((p.name, *_stat(p)) for p in jars_dir.glob("*.jar"))
    except OSError:
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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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


def _remove_stale_parts(folder: Path) -> None:
    """Part files and logs of dumps whose command is gone (killed, or failed)."""
    for name in glob.glob(str(folder / "*.part-*")):
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
    folder = cache / "jvm"
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
        if failed.exists():
            return []
        _remove_stale_parts(folder)
        lock = folder / f"spark-{key}.lock"
        if not _take_lock(lock):
            return []  # another command is dumping it
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
    """After a command that succeeded: stop Spark, let the JVM write its archive and
    exit, and move the archive into place.  Nothing when this run dumps none."""
    global _PENDING
    dump, _PENDING = _PENDING, None
    if dump is None:
        return
    from pyspark import SparkContext

    try:
        if SparkContext._active_spark_context is not None:
            SparkContext._active_spark_context.stop()
        proc = getattr(SparkContext._gateway, "proc", None)
        if proc is None:
            return
        # Spark's gateway exits on the end of its standard input.
        proc.stdin.close()
        try:
            rc = proc.wait(timeout=_DUMP_WAIT_S)
        except Exception:  # still writing: leave it, the part is removed later
            logger.debug("jvm: the class archive was not written within %s s", _DUMP_WAIT_S)
            return
        written = rc == 0 and dump.part.exists() and _LOG_SUCCESS in _read(dump.log)
        if written:
            os.replace(dump.part, dump.final)
            logger.debug("jvm: class archive written to %s", dump.final)
            _keep_newest(dump.final.parent)
        else:
            dump.failed.touch()
            logger.debug("jvm: no class archive (exit %s, see %s)", rc, dump.failed)
    except OSError as exc:
        logger.debug("jvm: class archive not kept: %s", exc)
    finally:
        dump.part.unlink(missing_ok=True)
        dump.log.unlink(missing_ok=True)
        dump.lock.unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _keep_newest(folder: Path) -> None:
    archives = sorted(folder.glob("spark-*.jsa"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[_KEEP:]:
        old.unlink(missing_ok=True)
