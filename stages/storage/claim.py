"""Create a small file only if nothing is there yet, in one atomic step: the
compare-and-swap on which the features table's commits are ordered.

Each filesystem has its own primitive, because a check then a write is a race:

* local disk: the content is written to a hidden file, then hard-linked to the name
  (``link(2)`` fails when the name exists; Hadoop's local rename would replace it);
* S3 (``s3://``, ``s3a://``): one ``PUT`` with ``If-None-Match: *`` through boto3 (S3's
  conditional write, since 2024-08; Hadoop 3.3's S3A has no way to send it), which S3
  refuses with 412 (or 409 for a racing PUT) when the key exists;
* HDFS and the others: a hidden file renamed to the name (HDFS's NameNode refuses a
  rename onto an existing file, atomically).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

from stages.base.s3a import DEFAULT_REGION
from stages.storage import hadoopfs
from stages.storage.fs import local_path

__all__ = ["create_exclusive"]

_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _create_local(path: str, data: bytes) -> bool:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _create_s3(uri: str, data: bytes) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    parsed = urlparse(uri)
    session = boto3.Session()
    client = session.client("s3", region_name=session.region_name or DEFAULT_REGION)
    try:
        client.put_object(
            Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), Body=data, IfNoneMatch="*"
        )
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if error.get("Code") in _TAKEN or status in _TAKEN:
            return False
        raise
    return True


def create_exclusive(spark, uri: str, text: str) -> bool:
    """Write ``text`` to ``uri`` if no file is there, atomically: ``True`` if this call
    created it, ``False`` if it existed (whoever wrote it, and whatever it holds).

    A reader sees the whole file or none of it.
    """
    data = text.encode("utf-8")
    local = local_path(uri)
    if local is not None:
        return _create_local(local, data)
    if urlparse(uri).scheme.lower() in ("s3", "s3a", "s3n"):
        return _create_s3(uri, data)
    parent, name = uri.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    hadoopfs.write_bytes(spark, tmp, data)
    if hadoopfs.rename(spark, tmp, uri):
        return True
    hadoopfs.delete(spark, tmp)
    return False
