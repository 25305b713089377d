"""The photos under an S3 prefix, listed by the executors: LISTs only, no HEAD.

Spark's own listing of ``s3a://`` costs one LIST per folder on the driver (in
parallel only above 32 folders a level), then its ``binaryFile`` reader asks each
file's status again (a HEAD per object) even when no byte is read.  The LIST
responses already carry each object's size and time; that is all a run needs.

:func:`listing_frame` lists the prefix's first level on the driver (one LIST per
1000 sub-folders), then ranges of consecutive sub-folders flat (``ListObjectsV2``
without a delimiter, 1000 keys a request, from one folder to the next range's
first), a few ranges per core: one request per 1000 objects however the photos
are spread over folders, in parallel.  Names are kept by the caller's rule (a regular
expression on the file name), never by Spark's, so ``_DSC0001.JPG`` and
``.hidden.jpg`` are listed like any photo.

Times are whole seconds (``Last-Modified`` of a HEAD or GET has no milliseconds,
and that is what earlier runs recorded), as ``modificationTime`` timestamps.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Dict, Iterator, List, Optional, Pattern, Tuple

from stages.storage import hadoopfs
from stages.storage.fetch import StoreSettings, requests_made, s3_client, split_s3

__all__ = [
    "LISTING_SCHEMA",
    "CountsParam",
    "is_glob",
    "list_flat",
    "list_level",
    "listing_frame",
    "listing_of",
    "RunRequests",
]

LISTING_SCHEMA = "path string, length long, modificationTime timestamp"
_PAGE = 1000  # S3's maximum keys per ListObjectsV2 response


def _stamp(dt: datetime) -> datetime:
    """A LIST's ``LastModified`` as a naive UTC datetime in whole seconds (Spark's
    timestamps are UTC instants; the session's time zone is UTC)."""
    return dt.astimezone(timezone.utc).replace(microsecond=0, tzinfo=None)


def _accept(pattern):
    """A file-name test from a regular expression (a string, or compiled with its flags)."""
    if isinstance(pattern, str):
        pattern = re.compile(pattern, re.DOTALL)
    rule = pattern
    return (lambda name: True) if rule is None else (lambda name: bool(rule.fullmatch(name)))


def list_flat(
    uri: str,
    settings: StoreSettings,
    pattern: Optional[Pattern] = None,
    first: str = "",
    end: str = "",
) -> Iterator[Tuple[str, int, datetime]]:
    """``(uri, size, time)`` of every object under the prefix ``uri`` (all depths)
    whose file name matches ``pattern``; one LIST per 1000 objects.

    With ``first`` (a sub-folder URI) only the objects in the sub-folders from
    ``first`` up to ``end`` (excluded; the last sub-folder when empty) are listed:
    one flat pass over a range of folders, however small each folder is.
    """
    scheme, bucket, prefix = split_s3(uri)
    accept = _accept(pattern)
    lo = split_s3(first)[2] if first else ""
    hi = split_s3(end)[2] if end else ""
    args = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": _PAGE}}
    if lo:
        args["StartAfter"] = lo  # keys sort after their folder's prefix: lo's marker only
    pages = s3_client(settings).get_paginator("list_objects_v2")
    for page in pages.paginate(**args):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if hi and key >= hi:
                return
            # In a range, an object directly under ``uri`` (no '/' after it) is not ours.
            if lo and "/" not in key[len(prefix) :]:
                continue
            if accept(key.rsplit("/", 1)[-1]):
                yield f"{scheme}://{bucket}/{key}", int(obj["Size"]), _stamp(obj["LastModified"])


def list_level(
    uri: str, settings: StoreSettings, pattern: Optional[Pattern] = None, files: bool = True
) -> Tuple[List[str], List[Tuple[str, int, datetime]]]:
    """The first level under the prefix ``uri``: its sub-folder URIs and (with
    ``files``) the matching objects directly in it; one LIST per 1000 entries."""
    scheme, bucket, prefix = split_s3(uri)
    accept = _accept(pattern)
    folders: List[str] = []
    found: List[Tuple[str, int, datetime]] = []
    pages = s3_client(settings).get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        folders += [f"{scheme}://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", [])]
        for obj in page.get("Contents", []) if files else []:
            key = obj["Key"]
            if accept(key.rsplit("/", 1)[-1]):
                stamp = _stamp(obj["LastModified"])
                found.append((f"{scheme}://{bucket}/{key}", int(obj["Size"]), stamp))
    return folders, found


class CountsParam:
    """A Spark ``AccumulatorParam`` adding ``{name: count}`` dicts (requests by kind)."""

    def zero(self, value: Dict[str, int]) -> Dict[str, int]:
        return {}

    def addInPlace(self, a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """``after - before`` of two request counts (kinds with no new request left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def listing_frame(
    spark, uri: str, settings: StoreSettings, pattern: Optional[Pattern] = None, counts=None
):
    """The matching objects under the prefix ``uri`` as a DataFrame of
    :data:`LISTING_SCHEMA`, listed by the executors.

    The driver lists the first level's sub-folders (one LIST per 1000); tasks list
    ranges of them flat (a few ranges per core), and one more task the objects
    directly under ``uri``.  Nothing that
    grows with the number of objects passes through the driver.

    Parameters
    ----------
    spark : SparkSession
    uri : str
        ``s3://``, ``s3a://`` or ``s3n://`` prefix (a folder: a trailing ``/`` is added).
    settings : StoreSettings
    pattern : str or re.Pattern, optional
        Regular expression a file name must match in full (compiled: with its flags).
    counts : Accumulator, optional
        Of :class:`CountsParam`: receives the executors' requests by operation (the
        driver's own are in :func:`stages.storage.fetch.requests_made`).

    Returns
    -------
    DataFrame
        Lazy: the listing runs when it is first computed (cache it to list once).
    """
    root = uri if uri.endswith("/") else uri + "/"
    # The driver keeps the sub-folders only; the objects directly under the root (a
    # few, or all of them in a flat folder) are listed again by a task.
    folders, _ = list_level(root, settings, pattern, files=False)
    sc = spark.sparkContext
    # Consecutive sub-folders in ranges, each listed flat in one pass: 1000 keys a
    # LIST whether the folders hold 10 photos or 10,000, a few ranges per core.
    n_ranges = max(1, min(len(folders), 4 * sc.defaultParallelism))
    step = -(-len(folders) // n_ranges) if folders else 1
    starts = list(range(0, len(folders), step))
    tasks: List[Tuple[str, str]] = [("", "")] + [
        (folders[i], folders[i + step] if i + step < len(folders) else "") for i in starts
    ]

    def run(items):
        before = requests_made(settings)
        for first, end in items:
            if first:
                yield from list_flat(root, settings, pattern, first, end)
            else:
                yield from list_level(root, settings, pattern)[1]
        if counts is not None:
            counts.add(delta(before, requests_made(settings)))

    return spark.createDataFrame(
        sc.parallelize(tasks, len(tasks)).mapPartitions(run), LISTING_SCHEMA
    )


def is_glob(uri: str) -> bool:
    """Whether ``uri`` holds Hadoop glob characters (``Test/2026/12/{01,02}/``)."""
    return any(c in uri for c in "{}[]*?")


def listing_of(
    spark, uri: str, settings: StoreSettings, pattern: Optional[Pattern] = None, counts=None
):
    """:func:`listing_frame` of ``uri``, or of every folder a Hadoop glob ``uri`` matches
    (the glob itself is expanded by Hadoop: a LIST per globbed level)."""
    if not is_glob(uri):
        return listing_frame(spark, uri, settings, pattern, counts)
    scheme = split_s3(uri)[0]
    frames = []
    files = []
    for match, is_dir in hadoopfs.glob_paths(spark, uri):
        # Hadoop qualifies the scheme as it likes (s3a:// stays s3a://); keep the user's.
        match = scheme + match[match.index("://") :]
        if is_dir:
            frames.append(listing_frame(spark, match, settings, pattern, counts))
        else:
            files += [f for f in list_flat(match, settings, pattern) if f[0] == match]
    out = spark.createDataFrame(files, LISTING_SCHEMA)
    for frame in frames:
        out = out.unionByName(frame)
    return out


class RunRequests:
    """The S3 requests of one run, by kind, from the clients' own statistics.

    Three places make requests: boto3 on the driver (the listing's first level),
    boto3 on the executors (the listing's ranges, the photos' GETs: added to
    :attr:`acc` by the tasks), and Hadoop's S3A in the driver's JVM (existence
    checks, the output's commit; in local mode the executors' writes too).  S3A's
    counters appear as ``s3a.<statistic>``; EMRFS keeps none we can read.
    """

    def __init__(self, spark, settings: Optional[StoreSettings], uris) -> None:
        self.spark = spark
        self.settings = settings
        self.acc = spark.sparkContext.accumulator({}, CountsParam())
        self._boto = requests_made(settings) if settings is not None else {}
        # One S3A filesystem per bucket: count each once.
        self._uris = list(
            {split_s3(u)[:2]: u for u in uris if u.lower().startswith("s3a://")}.values()
        )
        self._s3a = [hadoopfs.request_statistics(spark, u) for u in self._uris]

    def total(self) -> Dict[str, int]:
        """Requests since this object was made."""
        out = dict(self.acc.value)
        if self.settings is not None:
            for k, v in delta(self._boto, requests_made(self.settings)).items():
                out[k] = out.get(k, 0) + v
        for uri, before in zip(self._uris, self._s3a):
            for k, v in delta(before, hadoopfs.request_statistics(self.spark, uri)).items():
                out[f"s3a.{k}"] = out.get(f"s3a.{k}", 0) + v
        return dict(sorted(out.items()))
