"""Thin helpers over Hadoop's FileSystem through the driver's JVM.

They work for every URI Spark reads (local paths, ``file:``, ``s3a:``, EMRFS
``s3:``, ``hdfs:``) without a second client library.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

__all__ = [
    "bucket_missing",
    "delete",
    "java_message",
    "mkdirs",
    "exists",
    "glob_matches",
    "glob_paths",
    "request_statistics",
    "has_data",
    "list_dir",
    "list_files",
    "parquet_footer",
    "parquet_rows",
    "qualified",
    "read_bytes",
    "read_text",
    "rename",
    "write_bytes",
    "write_text",
    "write_text_atomic",
]


def _fs_and_path(spark, uri: str):
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(conf), path


def qualified(spark, uri: str) -> str:
    """``uri`` as its filesystem spells its files (scheme and authority added)."""
    fs, path = _fs_and_path(spark, uri)
    return fs.makeQualified(path).toString()


def glob_matches(spark, pattern: str) -> int:
    """How many paths the Hadoop glob ``pattern`` matches."""
    fs, path = _fs_and_path(spark, pattern)
    matches = fs.globStatus(path)
    return 0 if matches is None else len(matches)


def glob_paths(spark, pattern: str) -> List[Tuple[str, bool]]:
    """``(uri, is_dir)`` of the paths the Hadoop glob ``pattern`` matches."""
    fs, path = _fs_and_path(spark, pattern)
    matches = fs.globStatus(path)
    return [(m.getPath().toString(), bool(m.isDirectory())) for m in (matches or [])]


def request_statistics(spark, uri: str) -> Dict[str, int]:
    """The S3 requests this JVM's filesystem of ``uri`` has made so far, by S3A's
    statistic name (``object_list_request``, ``object_metadata_request`` (HEAD),
    ``action_http_get_request``, ``object_put_request`` ...); {} for a filesystem
    that keeps none (local, EMRFS)."""
    from py4j.protocol import Py4JError

    try:
        fs, _ = _fs_and_path(spark, uri)
        stats = fs.getStorageStatistics().getLongStatistics()
        out = {}
        while stats.hasNext():
            s = stats.next()
            name = s.getName()
            if name.startswith(("object_", "action_http_")) and s.getValue():
                out[name] = int(s.getValue())
        return out
    except Py4JError:
        return {}


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
    """``(uri, size)`` of the files under ``uri`` (recursive) whose name ends with ``suffix``.

    Like Spark's and pyarrow's readers, skips every file or folder below ``uri``
    whose name starts with ``_`` or ``.`` (``_SUCCESS``, a job's ``_temporary``,
    an unfinished run's ``_staging``).
    """
    fs, path = _fs_and_path(spark, uri)
    root = fs.makeQualified(path).toString().rstrip("/") + "/"
    out = []
    it = fs.listFiles(path, True)
    while it.hasNext():
        st = it.next()
        full = st.getPath().toString()
        rel = full[len(root) :] if full.startswith(root) else st.getPath().getName()
        if full.endswith(suffix) and not any(p.startswith(("_", ".")) for p in rel.split("/")):
            out.append((full, int(st.getLen())))
    return out


def list_dir(spark, uri: str) -> List[Tuple[str, bool, int, int]]:
    """``(name, is_dir, size, mtime_ms)`` of the entries directly in ``uri`` ([] if absent)."""
    if not exists(spark, uri):
        return []
    fs, path = _fs_and_path(spark, uri)
    return [
        (
            st.getPath().getName(),
            bool(st.isDirectory()),
            int(st.getLen()),
            int(st.getModificationTime()),
        )
        for st in fs.listStatus(path)
    ]


def rename(spark, src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst`` (a folder: atomic on local disks and HDFS; on S3 a
    copy then a delete per object).  The parent of ``dst`` is created if needed."""
    fs, s = _fs_and_path(spark, src)
    _, d = _fs_and_path(spark, dst)
    parent = d.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    return bool(fs.rename(s, d))


def write_text_atomic(spark, uri: str, text: str) -> None:
    """Write a small file so that readers see all of it or none of it.

    A hidden temporary file beside it is renamed into place (one object PUT on
    S3, where a file only appears once closed).  Refuses to replace ``uri``.
    """
    fs, path = _fs_and_path(spark, uri)
    tmp = path.getParent().toString() + "/." + path.getName() + ".tmp"
    write_bytes(spark, tmp, text.encode("utf-8"))
    _, tpath = _fs_and_path(spark, tmp)
    if not fs.rename(tpath, path):
        fs.delete(tpath, False)
        raise OSError(f"could not rename {tmp} to {uri} (does it exist already?)")


def read_text(spark, uri: str) -> str:
    """Read a small UTF-8 text file."""
    return read_bytes(spark, uri).decode("utf-8")


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


def _parquet_reader(spark, uri: str):
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    hfile = jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(
        jvm.org.apache.hadoop.fs.Path(uri), conf
    )
    return jvm.org.apache.parquet.hadoop.ParquetFileReader.open(hfile)


def parquet_footer(spark, uri: str) -> dict:
    """Key-value metadata of one Parquet file's footer (read by the driver's JVM)."""
    reader = _parquet_reader(spark, uri)
    try:
        kv = reader.getFooter().getFileMetaData().getKeyValueMetaData()
        return {str(k): str(kv.get(k)) for k in kv.keySet()}
    finally:
        reader.close()


def parquet_rows(spark, uri: str) -> int:
    """The row count one Parquet file's footer records (no Spark job)."""
    reader = _parquet_reader(spark, uri)
    try:
        return int(reader.getRecordCount())
    finally:
        reader.close()


def mkdirs(spark, uri: str) -> None:
    """Create the folder ``uri`` and its parents; raises ``OSError`` if it cannot."""
    fs, path = _fs_and_path(spark, uri)
    if not fs.mkdirs(path):
        raise OSError(f"cannot create {uri}")


def java_message(exc: BaseException) -> str:
    """The short message of a Java (or Python) exception, for a one-line error."""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            return str(java.getMessage() or java.getClass().getSimpleName())
        except Exception:  # the JVM may be gone
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
