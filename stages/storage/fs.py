"""One way to reach a file: local paths with plain Python, any Hadoop URI through Spark.

:func:`filesystem` gives a :class:`FileSystem`: :class:`LocalFileSystem` (open(),
os and pyarrow; no JVM, so a local ``RESULTS`` is read in a second without Spark)
or, given a SparkSession, :class:`HadoopFileSystem` (Hadoop's FileSystem in the
driver's JVM, :mod:`stages.storage.hadoopfs`: ``s3://``, ``s3a://``, ``hdfs:``, ``file:``).
Both read and write whole small files, list files, and read Parquet as an Arrow
table; both raise ``OSError`` for a file they cannot read.

:func:`local_path` is the one place that decides whether a URI is local.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import List, Optional, Sequence, Tuple

from stages.base.arrow_rdd import read_batch, to_arrow_batches
from stages.storage import hadoopfs

__all__ = [
    "FileSystem",
    "HadoopFileSystem",
    "LocalFileSystem",
    "filesystem",
    "local_path",
]

# A scheme has two letters at least, so a Windows drive (C:) is a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def local_path(uri: str) -> Optional[str]:
    """The local filesystem path of ``uri`` (a plain path or a ``file:`` URI), else None.

    ``file:/a/b``, ``file:///a/b`` and ``file://localhost/a/b`` all give ``/a/b``;
    ``s3://b/k`` gives None.
    """
    m = _SCHEME.match(uri)
    if m is None:
        return uri
    if m.group(1).lower() != "file":
        return None
    rest = uri[len(m.group(0)) :]
    if rest.startswith("//"):  # file://host/path: the host is dropped
        rest = rest[2:]
        rest = rest[rest.index("/") :] if "/" in rest else "/"
    return rest


class FileSystem:
    """What the stages, the report and the saved model need from a filesystem.

    Every method takes a URI (or a plain path, for the local one). Reading a file
    that is missing or unreadable raises ``OSError``.
    """

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` is a file or a folder (``False`` for an unreachable one)."""
        raise NotImplementedError

    def read_bytes(self, uri: str) -> bytes:
        """A whole (small) file."""
        raise NotImplementedError

    def read_text(self, uri: str) -> str:
        """A whole (small) UTF-8 text file."""
        return self.read_bytes(uri).decode("utf-8")

    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write (replace) the file ``uri`` with ``data``; return where it went."""
        raise NotImplementedError

    def list_files(self, uri: str, suffix: str = "") -> List[Tuple[str, int]]:
        """``(uri, size)`` of the files under ``uri`` (recursive) whose name ends with
        ``suffix``, leaving out names that start with ``_`` or ``.`` as Spark does."""
        raise NotImplementedError

    def read_parquet(
        self,
        uri: str,
        columns: Sequence[str],
        where_valid: Optional[str] = None,
        list_head: Optional[Tuple[str, int]] = None,
    ):
        """A Parquet file or folder as a ``pyarrow.Table`` of ``columns``.

        Parameters
        ----------
        uri : str
        columns : sequence of str
        where_valid : str, optional
            Keep only the rows where this column is not null.
        list_head : (str, int), optional
            Keep only the first ``n`` values of this list column: for a wide column
            of which the caller needs a few values, only those reach the driver.
        """
        raise NotImplementedError


class LocalFileSystem(FileSystem):
    """Local paths and ``file:`` URIs with plain Python and pyarrow (no JVM)."""

    def _path(self, uri: str) -> str:
        path = local_path(uri)
        if path is None:
            raise OSError(f"{uri} is not a local path")
        return path

    def exists(self, uri: str) -> bool:
        path = local_path(uri)
        return path is not None and os.path.exists(path)

    def read_bytes(self, uri: str) -> bytes:
        path = self._path(uri)
        # Checked first: open() on a FIFO would wait for a writer forever.
        if os.path.exists(path) and not os.path.isfile(path):
            raise OSError(f"{uri} is not a regular file")
        with open(path, "rb") as fh:
            return fh.read()

    def write_bytes(self, uri: str, data: bytes) -> str:
        path = self._path(uri)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # Written beside and renamed over: a killed run leaves the old file whole.
        # open(..., "xb") (not mkstemp) so the file gets the usual umask-based mode.
        temp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temp, "xb") as fh:
                fh.write(data)
            os.replace(temp, path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise
        return path

    def list_files(self, uri: str, suffix: str = "") -> List[Tuple[str, int]]:
        root = self._path(uri)
        if os.path.isfile(root):
            return [(root, os.path.getsize(root))] if root.endswith(suffix) else []
        out = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
            for name in sorted(files):
                if name.endswith(suffix) and not name.startswith(("_", ".")):
                    p = os.path.join(folder, name)
                    out.append((p, os.path.getsize(p)))
        return out

    def read_parquet(self, uri, columns, where_valid=None, list_head=None):
        import pyarrow.compute as pc
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        table = pq.read_table(
            self._path(uri),
            columns=list(columns),
            filters=None if where_valid is None else ds.field(where_valid).is_valid(),
        )
        if list_head is not None:
            name, n = list_head
            i = table.schema.get_field_index(name)
            table = table.set_column(
                i, name, pc.list_slice(table.column(name), 0, n, return_fixed_size_list=False)
            )
        return table


class HadoopFileSystem(FileSystem):
    """Any URI Spark reads, through Hadoop's FileSystem in the driver's JVM.

    Parquet is read by Spark on the executors; only the selected columns of the
    selected rows reach the driver, as Arrow batches (no Python object per row).
    """

    def __init__(self, spark) -> None:
        self.spark = spark

    def exists(self, uri: str) -> bool:
        return hadoopfs.exists(self.spark, uri)

    def read_bytes(self, uri: str) -> bytes:
        from py4j.protocol import Py4JJavaError

        try:
            return hadoopfs.read_bytes(self.spark, uri)
        except Py4JJavaError as exc:  # no such file, access denied: an OSError like open()'s
            raise OSError(f"cannot read {uri}: {hadoopfs.java_message(exc)}") from None

    def write_bytes(self, uri: str, data: bytes) -> str:
        hadoopfs.write_bytes(self.spark, uri, data)
        return uri

    def list_files(self, uri: str, suffix: str = "") -> List[Tuple[str, int]]:
        return hadoopfs.list_files(self.spark, uri, suffix)

    def read_parquet(self, uri, columns, where_valid=None, list_head=None):
        import pyarrow as pa
        from pyspark.sql import functions as F

        df = self.spark.read.parquet(uri)
        if where_valid is not None:
            df = df.where(F.col(where_valid).isNotNull())
        selected = [
            F.slice(c, 1, list_head[1]).alias(c) if list_head and c == list_head[0] else F.col(c)
            for c in columns
        ]
        rdd, schema, _ = to_arrow_batches(df.select(*selected))
        return pa.Table.from_batches([read_batch(b, schema) for b in rdd.collect()], schema)


def filesystem(spark=None) -> FileSystem:
    """:class:`HadoopFileSystem` given a SparkSession, else :class:`LocalFileSystem`."""
    return LocalFileSystem() if spark is None else HadoopFileSystem(spark)
