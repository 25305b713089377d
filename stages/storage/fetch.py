"""Photo bytes for the Python workers: one GET per object, many in flight.

Spark lists; the worker that featurizes a batch fetches its bytes here.  A HEAD per
object is never needed (the listing, or the GET's own response, gives the size and
the time), and S3's first-byte latency (10-50 ms) is hidden by keeping
:attr:`StoreSettings.in_flight` requests outstanding while the model works on the
previous batch.

One layer for every scheme the pipeline reads photos from: ``s3://`` (EMRFS on EMR),
``s3a://`` and ``s3n://`` through boto3, local paths and ``file:`` URIs with
``open()``.  Where S3 is and who we are come from the same place as S3A's
(:func:`store_settings`): the endpoint, region and path-style access of the Hadoop
configuration (a local S3 such as moto), its keys when it has some, otherwise boto3's
own chain on the worker (the instance role on EMR).

Every request is counted by operation (:class:`RequestCounter`), so a run can say
what it cost.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, Iterator, Optional, Tuple
from urllib.parse import unquote, urlsplit

from stages.storage.fs import local_path  # the one place that decides what is local

__all__ = [
    "DEFAULT_IN_FLIGHT",
    "Fetched",
    "ReadError",
    "RequestCounter",
    "StoreSettings",
    "fetch_ordered",
    "path_bytes_batches",
    "reader_settings",
    "requests_made",
    "is_object_store",
    "s3_client",
    "split_s3",
    "store_settings",
]

# Requests outstanding per Python worker.  At 20 ms a request, 32 in flight fetch
# ~1600 photos a second: far above what one core featurizes (~60/s at alpha 0.35),
# and small enough that a worker's memory holds them (32 x a few MB).
DEFAULT_IN_FLIGHT = 32
S3_SCHEMES = ("s3", "s3a", "s3n")
DEFAULT_REGION = "eu-west-3"


def split_s3(uri: str) -> Tuple[str, str, str]:
    """``(scheme, bucket, key)`` of an ``s3://``/``s3a://``/``s3n://`` URI (key as is)."""
    parts = urlsplit(uri)
    # urlsplit would cut the key at '?' or '#', which are legal in keys: split by hand.
    rest = uri[len(parts.scheme) + 3 :]
    bucket, _, key = rest.partition("/")
    return parts.scheme.lower(), bucket, key


def is_object_store(uri: str) -> bool:
    """Whether ``uri`` names an S3 object (``s3://``, ``s3a://``, ``s3n://``)."""
    head = uri.split(":", 1)[0].lower()
    return ":" in uri and head in S3_SCHEMES


@dataclass(frozen=True)
class StoreSettings:
    """How a worker reaches S3: picklable, made on the driver, shipped with the task.

    Attributes
    ----------
    endpoint : str or None
        A non-AWS endpoint (moto, MinIO); None for AWS itself.
    region : str
    path_style : bool
    access_key, secret_key, session_token : str or None
        Explicit keys (those S3A was given); None: boto3's chain on the worker.
    in_flight : int
        Requests outstanding per worker.
    """

    endpoint: Optional[str] = None
    region: str = DEFAULT_REGION
    path_style: bool = False
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    in_flight: int = DEFAULT_IN_FLIGHT


def reader_settings(spark, uri: str) -> Optional[StoreSettings]:
    """How the workers read the photos under ``uri``: S3's settings (:func:`store_settings`),
    plain ``open()`` for a local path, or None where Spark must read them (``hdfs:``)."""
    if is_object_store(uri):
        return store_settings(spark)
    return StoreSettings() if local_path(uri) is not None else None


def store_settings(spark=None, in_flight: int = DEFAULT_IN_FLIGHT) -> StoreSettings:
    """The settings S3A uses, read from the SparkContext's Hadoop configuration.

    Without Spark (or where the configuration says nothing), boto3 decides as it does
    for ``aws s3``: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, the profile, and
    its credential chain.
    """
    conf: Dict[str, Optional[str]] = {}
    if spark is not None:
        hconf = spark.sparkContext._jsc.hadoopConfiguration()
        for k in (
            "endpoint",
            "endpoint.region",
            "path.style.access",
            "connection.ssl.enabled",
            "access.key",
            "secret.key",
            "session.token",
        ):
            conf[k] = hconf.get(f"fs.s3a.{k}")
    endpoint = conf.get("endpoint") or None
    if endpoint and "://" not in endpoint:
        ssl = (conf.get("connection.ssl.enabled") or "true").lower() == "true"
        endpoint = ("https://" if ssl else "http://") + endpoint
    if endpoint and urlsplit(endpoint).hostname.endswith("amazonaws.com"):
        endpoint = None  # AWS itself: boto3 builds the regional endpoint
    if endpoint is None:  # not S3A's business: what boto3 on this machine would use
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = conf.get("endpoint.region") or os.environ.get("AWS_REGION")
    region = region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    return StoreSettings(
        endpoint=endpoint,
        region=region,
        path_style=(conf.get("path.style.access") or "false").lower() == "true"
        or endpoint is not None,
        access_key=conf.get("access.key") or None,
        secret_key=conf.get("secret.key") or None,
        session_token=conf.get("session.token") or None,
        in_flight=max(1, int(in_flight)),
    )


class RequestCounter:
    """S3 requests by operation (``GetObject``, ``ListObjectsV2`` ...), thread-safe.

    Counted from botocore's ``before-send`` event: one per HTTP request sent,
    retries included.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def __call__(self, event_name: str = "", **_) -> None:
        op = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self._counts[op] += 1

    def snapshot(self) -> Dict[str, int]:
        """The counts so far."""
        with self._lock:
            return dict(self._counts)


_lock = threading.Lock()
_clients: Dict[StoreSettings, object] = {}
_counters: Dict[StoreSettings, RequestCounter] = {}
_pools: Dict[int, ThreadPoolExecutor] = {}


def s3_client(settings: StoreSettings):
    """One boto3 S3 client per settings and process (clients are thread-safe), with a
    connection pool as large as the requests in flight; its :class:`RequestCounter`
    is :func:`requests_made`'s."""
    with _lock:
        client = _clients.get(settings)
        if client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()  # sessions are not thread-safe: one each
            config = Config(
                max_pool_connections=max(10, settings.in_flight),
                s3={"addressing_style": "path" if settings.path_style else "auto"},
                retries={"max_attempts": 5, "mode": "standard"},
            )
            client = session.client(
                "s3",
                region_name=settings.region,
                endpoint_url=settings.endpoint,
                aws_access_key_id=settings.access_key,
                aws_secret_access_key=settings.secret_key,
                aws_session_token=settings.session_token,
                config=config,
            )
            counter = RequestCounter()
            client.meta.events.register("before-send.s3", counter)
            _clients[settings] = client
            _counters[settings] = counter
        return client


def requests_made(settings: StoreSettings) -> Dict[str, int]:
    """S3 requests this process made with ``settings`` so far, by operation (none, and
    no client made, if it made none)."""
    with _lock:
        counter = _counters.get(settings)
    return counter.snapshot() if counter is not None else {}


def _pool(n: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="fruits-fetch")
        return pool


@dataclass
class Fetched:
    """One object's bytes, or why there are none.

    Attributes
    ----------
    data : bytes or None
    size : int
        Bytes read (0 on error).
    mtime_ms : int or None
        The modification time in milliseconds (an object's ``Last-Modified`` has
        whole seconds).
    error : str or None
    """

    data: Optional[bytes]
    size: int = 0
    mtime_ms: Optional[int] = None
    error: Optional[str] = None


_EMPTY = Fetched(b"", 0)


def _fetch_one(uri: str, settings: StoreSettings) -> Fetched:
    if is_object_store(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        _, bucket, key = split_s3(uri)
        try:
            resp = s3_client(settings).get_object(Bucket=bucket, Key=key)
            data = resp["Body"].read()
        except ClientError as exc:
            err = exc.response.get("Error", {})
            reason = f"{err.get('Code')} {err.get('Message')}"
            return Fetched(None, error=f"cannot read object: {reason}")
        except BotoCoreError as exc:
            return Fetched(None, error=f"cannot read object: {exc}")
        stamp = resp.get("LastModified")
        mtime = int(stamp.timestamp()) * 1000 if stamp is not None else None
        return Fetched(data, len(data), mtime)
    path = local_path(uri)
    if path is None:
        return Fetched(None, error=f"cannot read {uri}: not a local path or an S3 object")
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except OSError as exc:
        return Fetched(None, error=f"cannot read file: {exc.strerror or exc}")
    return Fetched(data, len(data), int(st.st_mtime * 1000))


def fetch_ordered(
    uris: Iterable[str], settings: StoreSettings, ahead: Optional[int] = None
) -> Iterator[Tuple[str, Fetched]]:
    """``(uri, Fetched)`` for each of ``uris``, in their order, fetched concurrently.

    Up to ``settings.in_flight`` requests run at once, and up to ``ahead`` objects
    (default: twice that) are fetched before the caller asks for them, so while the
    caller works on one batch the next one is on its way.  A failed read is a
    :class:`Fetched` with ``error`` set, never an exception.

    Parameters
    ----------
    uris : iterable of str
        Consumed lazily (a partition's paths as they arrive).
    settings : StoreSettings
    ahead : int, optional
        Objects held fetched-or-in-flight beyond the one being returned.
    """
    window = ahead if ahead is not None else 2 * settings.in_flight
    return _ordered(uris, lambda uri: _fetch_one(uri, settings), settings.in_flight, window)


def _ordered(uris: Iterable[str], fetch, threads: int, window: int):
    """``(uri, fetch(uri))`` in order, ``threads`` at once, up to ``window`` ahead."""
    pool = _pool(threads)
    window = max(1, window)
    pending: Deque[Tuple[str, Future]] = deque()
    it = iter(uris)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                try:
                    uri = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((uri, pool.submit(fetch, uri)))
            if not pending:
                return
            uri, fut = pending.popleft()
            yield uri, fut.result()
    finally:
        for _, fut in pending:  # the caller stopped early: drop what was not started
            fut.cancel()


class ReadError(str):
    """Why a photo's bytes could not be read (a row's ``error``), in place of its bytes."""


def path_bytes_batches(
    batches: Iterable,
    batch_size: int,
    settings: Optional[StoreSettings],
    to_paths=None,
    url_encoded: bool = False,
) -> Iterator[Tuple[list, list]]:
    """``(paths, contents)`` of at most ``batch_size`` photos, from Arrow batches.

    With ``settings``, the batches carry ``path`` (and optionally the listing's
    ``length``) and the bytes are fetched here (:func:`fetch_ordered`: the next
    batch's requests are in flight while the caller works on this one); a photo that
    cannot be read, or has zero bytes (no request made), gets a :class:`ReadError` in
    place of its bytes.  Without, the batches carry Spark's ``content`` as their
    second column (a filesystem this module does not read, such as ``hdfs:``).

    Parameters
    ----------
    batches : iterable of pyarrow.RecordBatch
        ``path`` first.
    batch_size : int
    settings : StoreSettings or None
    to_paths : callable, optional
        Maps a batch's scanned paths to the real ones (a local INPUT's rows are the
        photos' numbers); the real ones are read and returned.
    url_encoded : bool
        The paths are percent-encoded (as some Spark sources spell them): the object
        read is the decoded one; the path returned stays as given.
    """
    if settings is None:
        for batch in batches:
            paths = batch.column(0).to_pylist()
            if to_paths is not None:
                paths = to_paths(paths)
            contents = batch.column(1)
            for i in range(0, len(paths), batch_size):
                yield paths[i : i + batch_size], [c.as_py() for c in contents[i : i + batch_size]]
        return

    empty: set = set()

    def all_paths():
        for batch in batches:
            paths = batch.column(0).to_pylist()
            if to_paths is not None:
                paths = to_paths(paths)
            names = batch.schema.names
            sizes = batch.column(names.index("length")).to_pylist() if "length" in names else None
            for i, path in enumerate(paths):
                if sizes is not None and sizes[i] == 0:
                    empty.add(path)
                yield path

    def fetch_one(path):
        return (
            _EMPTY
            if path in empty
            else _fetch_one(unquote(path) if url_encoded else path, settings)
        )

    ahead = batch_size + settings.in_flight  # the next model batch, and more in flight
    paths, contents = [], []
    for uri, got in _ordered(all_paths(), fetch_one, settings.in_flight, ahead):
        paths.append(uri)
        if got.error is not None:
            contents.append(ReadError(got.error))
        elif not got.data:
            contents.append(ReadError("empty file (0 bytes)"))
        else:
            contents.append(got.data)
        if len(paths) == batch_size:
            yield paths, contents
            paths, contents = [], []
    if paths:
        yield paths, contents
