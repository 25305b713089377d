"""Thin helpers over Hadoop's FileSystem through the driver's JVM.

They work for every URI Spark reads (local paths, ``file:``, ``s3a:``, EMRFS
``s3:``, ``hdfs:``) without a second client library.
"""

from __future__ import annotations

from typing import List, Tuple

__all__ = [
    "delete",
    "java_message",
    "mkdirs",
    "rename",
    "exists",
    "has_data",
    "list_files",
    "parquet_footer",
    "read_bytes",
    "write_bytes",
    "write_text",
]


def _fs_and_path(spark, uri: str):
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(conf), path


def exists(spark, uri: str) -> bool:
    """Whether ``uri`` exists (file or folder); ``False`` when its bucket does not."""
    from py4j.protocol import Py4JJavaError

    try:
        fs, path = _fs_and_path(spark, uri)
        return bool(fs.exists(path))
    except Py4JJavaError as exc:
        if _is_missing_bucket(exc):
            return False
        raise


def bucket_missing(spark, uri: str) -> bool:
    """Whether ``uri`` is in an object-store bucket that does not exist."""
    from py4j.protocol import Py4JJavaError

    try:
        fs, path = _fs_and_path(spark, uri)
        fs.exists(path)
    except Py4JJavaError as exc:
        if _is_missing_bucket(exc):
            return True
        raise
    return False


def _is_missing_bucket(exc) -> bool:
    name = exc.java_exception.getClass().getName()
    return name.endswith(("UnknownStoreException", "NoSuchBucketException"))


def has_data(spark, uri: str) -> bool:
    """Whether ``uri`` exists and is a file or a non-empty folder."""
    if not exists(spark, uri):
        return False
    fs, path = _fs_and_path(spark, uri)
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
    write_bytes(spark, uri, text.encode("utf-8"))


def write_bytes(spark, uri: str, data: bytes) -> None:
    """Write (replace) a file with ``data``."""
    fs, path = _fs_and_path(spark, uri)
    out = fs.create(path, True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()


def read_bytes(spark, uri: str) -> bytes:
    """Read a whole (small) file."""
    jvm = spark.sparkContext._jvm
    fs, path = _fs_and_path(spark, uri)
    stream = fs.open(path)
    try:
        return bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
    finally:
        stream.close()


def delete(spark, uri: str) -> bool:
    """Delete ``uri`` recursively; ``False`` when it did not exist."""
    fs, path = _fs_and_path(spark, uri)
    return bool(fs.delete(path, True))


def parquet_footer(spark, uri: str) -> dict:
    """Key-value metadata of one Parquet file's footer (read by the driver's JVM)."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    hfile = jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(
        jvm.org.apache.hadoop.fs.Path(uri), conf
    )
    reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(hfile)
    try:
        kv = reader.getFooter().getFileMetaData().getKeyValueMetaData()
        return {str(k): str(kv.get(k)) for k in kv.keySet()}
    finally:
        reader.close()


def mkdirs(spark, uri: str) -> None:
    """Create the folder ``uri`` and its parents; raises ``OSError`` if it cannot."""
    fs, path = _fs_and_path(spark, uri)
    if not fs.mkdirs(path):
        raise OSError(f"cannot create {uri}")


def rename(spark, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (a rename on local and HDFS, a copy on object stores)."""
    fs, path = _fs_and_path(spark, src)
    _, target = _fs_and_path(spark, dst)
    if not fs.rename(path, target):
        raise OSError(f"cannot rename {src} to {dst}")


def java_message(exc: BaseException) -> str:
    """The short message of a Java (or Python) exception, for a one-line error."""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            return str(java.getMessage() or java.getClass().getSimpleName())
        except Exception:  # the JVM may be gone
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
