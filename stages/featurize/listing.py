"""Every image file under a local INPUT, exactly once.

Spark's file scan has rules that lose or multiply a user's photos: it skips every
file or folder whose name starts with ``_`` or ``.`` (``_DSC0001.JPG`` is how Nikon and
Sony cameras name Adobe-RGB photos), drops zero-byte files, follows folder symlinks
round a loop (``A/up -> ..`` turned 2 photos into 82 rows), reads names in the JVM's
locale, and takes paths as globs (``[``, ``{``) or fails on a ``:`` in a name.

So for a local INPUT we list the files ourselves (:func:`walk_images`): Python's walk,
symlinks followed with each real folder visited once, names as the filesystem has
them, whatever the locale.  Spark's rows are then the photos' numbers, which no Spark
rule can lose; each worker maps them back to the real paths and reads the files
(:mod:`stages.featurize.batch`).

The rule for names: every file whose name ends in ``.jpg`` or ``.jpeg`` (any case)
is an image file and gets exactly one row, hidden names included.  A macOS
AppleDouble file (``._photo.jpg``, metadata Finder leaves on other filesystems) is
such a file too: it becomes an error row that says what it is.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from stages.base.contract import IMAGE_NAME

__all__ = [
    "IMAGE_NAME",
    "LocalListing",
    "walk_images",
    "listing_table",
    "file_uri",
]


def file_uri(path: str) -> str:
    """The ``path`` column's spelling of a local file: ``file:`` + absolute path, as
    Spark's ``binaryFile`` spells it (not percent-encoded)."""
    return "file:" + os.path.abspath(path)


@dataclass
class LocalListing:
    """The image files under a local folder.

    Attributes
    ----------
    files : list of (path, size)
        Readable regular files (after following symlinks), absolute paths.
    errors : list of (path, reason)
        Image files that cannot be read: broken or looping symlinks, no permission,
        zero bytes.
    cycles : int
        Folder symlinks not followed because they lead back to a folder already seen.
    mtimes_ms : list of int
        The files' modification times, milliseconds since the epoch (as Spark's
        ``binaryFile`` gives them), in the order of ``files``.
    """

    files: List[Tuple[str, int]] = field(default_factory=list)
    errors: List[Tuple[str, str]] = field(default_factory=list)
    cycles: int = 0
    mtimes_ms: List[int] = field(default_factory=list)


def walk_images(top: str) -> LocalListing:
    """List every image file under ``top`` once (see the module's rule).

    Folder symlinks are followed; a folder reached a second time (a loop, or two
    links to one folder) is not walked again, so each file is listed once, under the
    first path that reached it.
    """
    out = LocalListing()
    seen = set()
    top = os.path.abspath(top)
    try:
        st = os.stat(top)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        return out
    for root, dirs, files in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirs):
            try:
                st = os.stat(os.path.join(root, d))
            except OSError:
                continue  # a broken folder link holds nothing to list
            key = (st.st_dev, st.st_ino)
            if key in seen:
                out.cycles += 1
                continue
            seen.add(key)
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if not IMAGE_NAME.match(name):
                continue
            path = os.path.join(root, name)
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:  # bytes no UTF-8 text can hold (a Latin-1 name)
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                out.errors.append((shown, "file name is not valid UTF-8: rename the file"))
                continue
            try:
                st = os.stat(path)
            except OSError as exc:
                reason = {
                    errno.ENOENT: "broken symbolic link (its target does not exist)",
                    errno.ELOOP: "symbolic link loop",
                    errno.EACCES: "permission denied",
                }.get(exc.errno, f"cannot stat file: {exc.strerror}")
                out.errors.append((path, reason))
                continue
            if not os.access(path, os.R_OK):
                out.errors.append((path, "permission denied"))
            elif st.st_size == 0:
                out.errors.append((path, "empty file (0 bytes)"))
            else:
                out.files.append((path, int(st.st_size)))
                out.mtimes_ms.append(st.st_mtime_ns // 1_000_000)
    return out


def listing_table(local: LocalListing):
    """``local`` as the Arrow table ``featurize --incremental`` plans from: ``path`` (as
    :func:`file_uri` spells it), ``length`` and ``modificationTime`` (ms, UTC).  A
    zero-byte file has length 0; a file that cannot be read has length -1 and no time
    (the worker's read gives its reason)."""
    import pyarrow as pa

    paths = [file_uri(p) for p, _ in local.files]
    lengths = [size for _, size in local.files]
    times: List[Optional[int]] = list(local.mtimes_ms)
    for path, reason in local.errors:
        paths.append(file_uri(path))
        empty = reason.startswith("empty file")
        lengths.append(0 if empty else -1)
        try:
            times.append(os.stat(path).st_mtime_ns // 1_000_000 if empty else None)
        except OSError:
            times.append(None)
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "length": pa.array(lengths, pa.int64()),
            "modificationTime": pa.array(times, pa.timestamp("ms", tz="UTC")),
        }
    )
