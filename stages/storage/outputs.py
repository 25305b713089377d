"""Where a stage may write, and writing so that a failed run never damages what was there.

Two rules protect a user's data:

* **No overlap.** An output is never an input, inside it, or a parent of it (featurize:
  OUTPUT vs INPUT; reduce: RESULTS vs FEATURES; run: all three).  Checked on the
  strings before any JVM starts (:func:`check_disjoint`), so ``--overwrite`` can never
  empty the photos.
* **Write beside, then swap.** A stage writes into a hidden sibling
  (``.<name>.fruits-tmp-<id>``) and moves it into place only once it is complete
  (:func:`atomic_output`); an old output is moved aside first and deleted last.  On a
  local or HDFS filesystem both moves are renames: a run killed at any point leaves
  the old output whole and readable (killed in the instant between the two renames,
  it is under its ``.fruits-old-`` name, and the next run on that output moves it
  back before anything else).  On object stores (``s3://``, ``s3a://``)
  a rename is a copy, so a new output is written in place with Spark's commit
  protocol (a killed run leaves no ``_SUCCESS``, which ``reduce`` refuses), and only
  ``--overwrite`` pays for writing beside and copying.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple
from urllib.parse import urlparse

from stages.base.errors import UsageError
from stages.storage import hadoopfs

__all__ = [
    "normalize",
    "check_disjoint",
    "check_output",
    "atomic_output",
    "default_features_path",
    "OBJECT_STORES",
]

OBJECT_STORES = ("s3", "s3a", "s3n", "gs", "abfs", "abfss", "wasb", "wasbs")


def normalize(uri: str) -> str:
    """A comparable spelling of a local path or URI: ``scheme://authority/abs/path``.

    Local paths (and ``file:`` URIs) are made absolute with symlinks resolved, so
    ``Features/..`` and a symlink to the input compare equal to what they name.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # 1: a Windows drive
        path = parsed.path if parsed.scheme == "file" else uri
        return "file://" + os.path.realpath(os.path.expanduser(path)).rstrip("/")
    path = posixpath.normpath("/" + parsed.path.lstrip("/")) if parsed.path else "/"
    scheme = "s3" if parsed.scheme in ("s3", "s3a", "s3n") else parsed.scheme
    return f"{scheme}://{parsed.netloc}{path.rstrip('/')}"


def _inside(a: str, b: str) -> bool:
    """Whether normalized ``a`` is ``b`` or lies under it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def check_disjoint(pairs: Sequence[Tuple[str, str, str, str]]) -> None:
    """Refuse an output that is an input, inside it, or a parent of it.

    Parameters
    ----------
    pairs : sequence of (output name, output, input name, input)
        E.g. ``("OUTPUT", out, "INPUT", inp)``.

    Raises
    ------
    UsageError
        Naming both and what to do; nothing has been touched.
    """
    for out_name, out, in_name, inp in pairs:
        o, i = normalize(out), normalize(inp)
        if o == i:
            why = "is"
        elif _inside(o, i):
            why = "is inside"
        elif _inside(i, o):
            why = "contains"
        else:
            continue
        raise UsageError(
            f"{out_name} {out} {why} {in_name} {inp}: writing there could destroy the "
            f"{in_name.lower()}; choose an {out_name} outside it"
        )


def is_object_store(uri: str) -> bool:
    """Whether ``uri`` is on an object store, where a rename is a copy."""
    return urlparse(uri).scheme.lower() in OBJECT_STORES


def check_output(spark, output: str, overwrite: bool) -> None:
    """Refuse to replace an existing output without ``overwrite``, or to start a job
    whose output bucket does not exist (it would fail only at the end)."""
    if hadoopfs.bucket_missing(spark, output):
        raise UsageError(f"the bucket of output {output} does not exist: create it first")
    if not overwrite and hadoopfs.has_data(spark, output):
        raise UsageError(
            f"output {output} already exists: pass --overwrite to replace it, "
            "or choose another path"
        )


def _glob_literal(text: str) -> str:
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", text)


def _restore_aside(spark, output: str) -> None:
    """Finish a swap that was killed between its two renames: the old output, moved
    aside, goes back in place (when there is no output); an old output left aside by a
    swap that completed is deleted."""
    base = output.rstrip("/")
    parent, name = posixpath.split(base)
    aside = [
        u for u, _ in hadoopfs.glob_paths(spark, f"{parent}/.{_glob_literal(name)}.fruits-old-*")
    ]
    if not aside:
        return
    if len(aside) == 1 and not hadoopfs.exists(spark, output):
        if not hadoopfs.rename(spark, aside[0], output):
            raise OSError(f"cannot move {aside[0]} back to {output}")
        return
    if hadoopfs.exists(spark, output):
        for uri in aside:
            hadoopfs.delete(spark, uri)


def _sibling(output: str, tag: str) -> str:
    base = output.rstrip("/")
    parent, name = posixpath.split(base)
    return f"{parent}/.{name}.fruits-{tag}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_output(spark, output: str, overwrite: bool) -> Iterator[str]:
    """Yield the URI to write into; on success it becomes ``output``.

    Checks first (:func:`check_output`), and that the output's parent is writable
    (by creating the hidden sibling), before any image is read.  On failure the
    sibling is deleted and ``output`` is as it was.
    """
    if not is_object_store(output):
        _restore_aside(spark, output)
    check_output(spark, output, overwrite)
    if is_object_store(output) and not hadoopfs.has_data(spark, output):
        yield output  # Spark's committer writes _SUCCESS last; no copy for a new output
        return
    temp = _sibling(output, "tmp")
    try:
        hadoopfs.mkdirs(spark, temp)
    except Exception as exc:  # the JVM's IOException: say it in the user's words
        raise UsageError(
            f"cannot write beside output {output} ({hadoopfs.java_message(exc)}): "
            "check that its folder exists and is writable"
        ) from None
    hadoopfs.delete(spark, temp)  # Spark's writer wants to create the folder itself
    done = False
    try:
        yield temp
        old: Optional[str] = None
        if hadoopfs.exists(spark, output):
            old = _sibling(output, "old")
            if not hadoopfs.rename(spark, output, old):
                raise OSError(f"cannot move the old {output} aside to {old}")
        if not hadoopfs.rename(spark, temp, output):
            if old is not None:
                hadoopfs.rename(spark, old, output)
            raise OSError(f"cannot move the new output {temp} to {output}")
        done = True
        if old is not None:
            hadoopfs.delete(spark, old)
    finally:
        if not done and hadoopfs.exists(spark, temp):
            hadoopfs.delete(spark, temp)


def default_features_path(results: str) -> str:
    """``Features`` beside ``results`` (``s3://b/Results/`` -> ``s3://b/Features``)."""
    parent = posixpath.dirname(results.rstrip("/"))
    if not parent or parent.endswith(":") or parent.endswith(":/"):
        raise UsageError(f"cannot put Features beside {results}: pass --features PATH")
    return posixpath.join(parent, "Features")
