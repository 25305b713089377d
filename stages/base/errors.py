"""Errors the CLI reports in one line: what went wrong, how to fix it, and the exit code.

:class:`UsageError` is ours (a bad argument or input, exit 2).  :func:`explain` turns
any other exception, Java ones included, into such a line: the failures a user can
cause and fix (a corrupt Parquet file, a folder left by a killed run, S3 refusing
access, no S3 connector) keep exit code 2; anything else is a failed run, exit 1, and
the causes a user meets (a full disk, a file another run wrote, S3 throttling) say so.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Callable, List, Tuple, Union

__all__ = [
    "UsageError",
    "StepFailed",
    "EXIT_USAGE",
    "EXIT_FAILED",
    "explain",
    "exception_text",
]

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """A bad argument or input: the message says what is wrong and how to fix it."""


class StepFailed(Exception):
    """A later step failed once the earlier ones were committed: the message says what
    is kept and the command that finishes the work (exit 1)."""


def exception_text(exc: BaseException) -> str:
    """The messages of ``exc`` and of every cause, Java causes included, one per line."""
    parts: List[str] = []
    seen = set()
    cur = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        java = getattr(cur, "java_exception", None)
        if java is not None:
            try:
                jcur, depth = java, 0
                while jcur is not None and depth < 20:
                    parts.append(str(jcur.toString()))
                    jcur, depth = jcur.getCause(), depth + 1
            except Exception:  # the JVM may be gone
                pass
        parts.append(f"{type(cur).__name__}: {_message(cur)}")
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def _message(exc: BaseException) -> str:
    """``str(exc)``; a Py4J error asks the JVM for its message, which fails once the JVM
    has ended: then that, not a second exception inside the error report."""
    try:
        return str(exc)
    except Exception as inner:  # the JVM is gone (ConnectionRefusedError, Py4JNetworkError)
        return f"(its message is lost: {type(inner).__name__} asking Spark's JVM for it)"


_URI = r"((?:file|s3a?|hdfs|gs|abfss?):/+[^\s'\"\]\),]+)"


def _path_in(text: str) -> str:
    m = re.search(_URI, text)
    return m.group(1).rstrip(".:;") if m else "the input"


def _shown(path: str) -> str:
    """``path`` as the user gave it: a local path without ``file:``, and the final name of
    a hidden sibling being written (``.<name>.fruits-tmp-<id>``, see stages.outputs)."""
    path = re.sub(r"/\.([^/]+)\.fruits-(?:tmp|old)-[0-9a-f]+(?=/|$)", r"/\1", path)
    return re.sub(r"^file:/+", "/", path)


def _output_in(text: str) -> str:
    """The output folder a failed write was writing (no ``_temporary/`` or part file)."""
    m = re.search(r"writing rows to " + _URI, text) or re.search(_URI, text)
    if not m:
        return "the output"
    return _shown(re.sub(r"/_temporary/.*$|/part-[^/]*$", "", m.group(1).rstrip(".:;")))


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _no_space(text: str) -> str:
    out = _output_in(text)
    free = ""
    if out.startswith("/"):
        folder = out
        while folder and not os.path.exists(folder):
            folder = os.path.dirname(folder)
        try:
            usage = shutil.disk_usage(folder or "/")
            free = f" ({_size(usage.free)} free of {_size(usage.total)})"
        except OSError:
            pass
    return (
        f"no space left on the device holding {out}{free}: free some space there or "
        "write to a larger disk, then run again"
    )


# (pattern in the exception text, exit code, message or a function of the text that makes
# it); the first match wins.
_KNOWN: List[Tuple[str, int, Union[str, Callable[[str], str]]]] = [
    (
        r"ClassNotFoundException: (?:Class )?org\.apache\.hadoop\.fs\.s3a\.S3AFileSystem",
        EXIT_USAGE,
        "s3a:// needs Hadoop's S3A connector jars: install them with "
        "`pip install --no-deps sagemaker_pyspark==1.4.5` (`make install` does)",
    ),
    (
        r"UNABLE_TO_INFER_SCHEMA",
        EXIT_USAGE,
        "{path} holds no readable Parquet data (a run that was killed leaves only "
        "_temporary/): write it again",
    ),
    (
        r"is not a Parquet file|Could not read footer|CannotReadFooter|"
        r"FAILED_READ_FILE.*(?:parquet|Parquet)|expected magic number",
        EXIT_USAGE,
        "{path} is not a readable Parquet file (corrupt or truncated): write it again "
        "or remove the file",
    ),
    (
        r"AccessDenied|Access Denied|403 Forbidden|Status Code: 403",
        EXIT_USAGE,
        "access denied by S3 on {path}: check the credentials (AWS_PROFILE, "
        "AWS_ACCESS_KEY_ID) and the bucket policy",
    ),
    (
        r"NoSuchBucket|Bucket does not exist|UnknownStoreException",
        EXIT_USAGE,
        "the bucket of {path} does not exist: create it first",
    ),
    (r"No space left on device|ENOSPC", EXIT_FAILED, _no_space),
    (
        # The JVM ended under the run (killed: a SIGTERM to the whole process group, the
        # kernel's OOM killer): Py4J's connection to it broke.
        r"Py4JNetworkError|asking Spark's JVM",
        EXIT_FAILED,
        "Spark's JVM ended during the run (killed, or out of memory): run again (what was "
        "committed before is whole)",
    ),
    (
        # Two runs writing the same output: Hadoop refuses the second create.
        r"FileAlreadyExistsException",
        EXIT_FAILED,
        lambda text: (
            f"{_shown(_path_in(text))} already exists: two runs were writing the same output at "
            "once (one writer at a time), or a killed run left it: run again when the other "
            "has finished"
        ),
    ),
    (
        # S3A retried (fs.s3a.retry.throttle.limit) and S3 still answered 503 SlowDown.
        r"AWSServiceThrottledException|Error Code: SlowDown|Status Code: 503",
        EXIT_FAILED,
        "S3 throttled the requests on {path} (503 SlowDown) even after the retries: run "
        "again later or with fewer tasks, or allow more retries with --conf "
        "spark.hadoop.fs.s3a.retry.throttle.limit=40",
    ),
    (
        r"OutOfMemoryError",
        EXIT_FAILED,
        "out of memory: raise FRUITS_DRIVER_MEMORY (driver) or pass "
        "--conf spark.executor.memory=... and retry",
    ),
]


def explain(exc: BaseException) -> Tuple[int, str]:
    """``(exit code, one-line message)`` for ``exc``."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc).splitlines()[0] if str(exc) else "bad input"
    if isinstance(exc, StepFailed):
        return EXIT_FAILED, str(exc).splitlines()[0]
    text = exception_text(exc)
    for pattern, code, message in _KNOWN:
        if re.search(pattern, text):
            if callable(message):
                return code, message(text)
            return code, message.format(path=_path_in(text))
    first = next((line.strip() for line in _message(exc).splitlines() if line.strip()), "")
    head = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(head) > 300:
        head = head[:297] + "..."
    return EXIT_FAILED, f"the run failed: {head}"
