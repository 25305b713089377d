"""Thin helpers over Hadoop's FileSystem through the driver's JVM.

They work for every URI Spark reads (local paths, ``file:``, ``s3a:``, EMRFS
``s3:``, ``hdfs:``) without a second client library.
"""

from __future__ import annotations

from typing import List, Tuple

__all__ = ["exists", "has_data", "list_files", "read_text", "write_text"]


def _fs_and_path(spark, uri: str):
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(conf), path


def exists(spark, uri: str) -> bool:
    """Whether ``uri`` exists (file or folder)."""
    fs, path = _fs_and_path(spark, uri)
    return bool(fs.exists(path))


def has_data(spark, uri: str) -> bool:
    """Whether ``uri`` exists and is a file or a non-empty folder."""
    fs, path = _fs_and_path(spark, uri)
    if not fs.exists(path):
        return False
    status = fs.getFileStatus(path)
    if not status.isDirectory():
        return True
    return len(fs.listStatus(path)) > 0


def list_files(spark, uri: str, suffix: str = "") -> List[Tuple[str, int]]:
    """``(uri, size)`` of the files under ``uri`` (recursive) whose name ends with ``suffix``."""
    fs, path = _fs_and_path(spark, uri)
    out = []
    it = fs.listFiles(path, True)
    while it.hasNext():
        st = it.next()
        name = st.getPath().getName()
        if name.endswith(suffix) and not name.startswith(("_", ".")):
            out.append((st.getPath().toString(), int(st.getLen())))
    return out


def write_text(spark, uri: str, text: str) -> None:
    """Write (replace) a small UTF-8 text file."""
    fs, path = _fs_and_path(spark, uri)
    out = fs.create(path, True)
    try:
        out.write(bytearray(text.encode("utf-8")))
    finally:
        out.close()


def read_text(spark, uri: str) -> str:
    """Read a small UTF-8 text file."""
    jvm = spark.sparkContext._jvm
    fs, path = _fs_and_path(spark, uri)
    stream = fs.open(path)
    try:
        data = jvm.org.apache.commons.io.IOUtils.toByteArray(stream)
    finally:
        stream.close()
    return bytes(data).decode("utf-8")
