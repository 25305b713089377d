"""The workers' byte fetcher against a real S3 protocol (moto's server behind the
counting proxy of benchmarks/s3_latency_proxy.py) and local files: one GET per
object, no HEAD, many in flight, order kept, errors as values."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from benchmarks.s3_latency_proxy import LatencyProxy, request_kind
from stages.storage.fetch import (
    StoreSettings,
    fetch_ordered,
    is_object_store,
    requests_made,
    split_s3,
    store_settings,
)
from tests import s3_fixtures
from tests.s3_fixtures import REGION

moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client
# Its own bucket: the moto server lives for the session, and test_s3a creates s3_fixtures.BUCKET.
BUCKET = "fetch-tests"

# Spaces, '+', '%', non-ASCII, '?' and '#': each is spelled differently in a URL.
ODD_KEYS = [
    "Fetch/Apple Braeburn/a b.jpg",
    "Fetch/Kiwi/1+1.jpg",
    "Fetch/Kiwi/100%.jpg",
    "Fetch/Pêche/été.jpg",
    "Fetch/Kiwi/what?.jpg",
    "Fetch/Kiwi/#1.jpg",
]


@pytest.fixture(scope="module")
def proxy(moto_s3_endpoint) -> Iterator[LatencyProxy]:
    with LatencyProxy(moto_s3_endpoint, latency_ms=0) as p:
        yield p


@pytest.fixture(scope="module")
def bucket(moto_s3_client):
    moto_s3_client.create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    bodies = {}
    for i in range(40):
        key = f"Fetch/Many/{i:03d}.jpg"
        bodies[key] = os.urandom(1000 + i)
    for i, key in enumerate(ODD_KEYS):
        bodies[key] = f"body {i}".encode()
    for key, body in bodies.items():
        moto_s3_client.put_object(Bucket=BUCKET, Key=key, Body=body)
    return bodies


def _settings(proxy: LatencyProxy, **kw) -> StoreSettings:
    return StoreSettings(
        endpoint=proxy.endpoint, region=REGION, path_style=True,
        access_key="testing", secret_key="testing", **kw,
    )  # fmt: skip


def test_each_object_is_one_get_and_no_head(proxy, bucket):
    keys = sorted(k for k in bucket if k.startswith("Fetch/Many/"))
    uris = [f"s3a://{BUCKET}/{k}" for k in keys]
    settings = _settings(proxy, in_flight=8)
    before = requests_made(settings)
    proxy.reset()
    got = list(fetch_ordered(uris, settings))
    counts = proxy.snapshot()
    assert [u for u, _ in got] == uris  # in the order asked
    assert [f.data for _, f in got] == [bucket[k] for k in keys]
    assert all(f.size == len(bucket[k]) and f.error is None for (_, f), k in zip(got, keys))
    assert all(f.mtime_ms is not None and f.mtime_ms % 1000 == 0 for _, f in got)
    assert counts == {"GET": len(keys)}, counts
    per_object = proxy.per_object("GET")
    assert set(per_object.values()) == {1} and len(per_object) == len(keys)
    # The client's own count (what a run's summary records) agrees with the server's.
    after = requests_made(settings)
    assert after.get("GetObject", 0) - before.get("GetObject", 0) == len(keys)


def test_requests_are_in_flight_together(proxy, bucket):
    # 50 ms a request: fetched one after another, never two at once at the proxy.
    keys = sorted(k for k in bucket if k.startswith("Fetch/Many/"))[:24]
    proxy.set_latency(50)
    try:
        proxy.reset()
        list(fetch_ordered([f"s3://{BUCKET}/{k}" for k in keys], _settings(proxy, in_flight=8)))
        most = proxy.max_active
        proxy.reset()
        list(fetch_ordered([f"s3://{BUCKET}/{k}" for k in keys], _settings(proxy, in_flight=1)))
        one = proxy.max_active
    finally:
        proxy.set_latency(0)
    assert one == 1
    assert 4 <= most <= 8, most


def test_odd_keys_are_read_as_named(proxy, bucket):
    uris = [f"s3a://{BUCKET}/{k}" for k in ODD_KEYS]
    got = dict(fetch_ordered(uris, _settings(proxy)))
    assert {split_s3(u)[2]: f.data for u, f in got.items()} == {k: bucket[k] for k in ODD_KEYS}


def test_a_missing_object_is_an_error_value(proxy, bucket):
    uris = [f"s3a://{BUCKET}/Fetch/Many/000.jpg", f"s3a://{BUCKET}/Fetch/nope.jpg"]
    (_, ok), (_, missing) = list(fetch_ordered(uris, _settings(proxy)))
    assert ok.data == bucket["Fetch/Many/000.jpg"]
    assert missing.data is None and missing.size == 0
    assert missing.error is not None and "NoSuchKey" in missing.error


def test_local_files_and_file_uris(tmp_path):
    a, b = tmp_path / "a b.jpg", tmp_path / "é.jpg"
    a.write_bytes(b"aaa")
    b.write_bytes(b"bb")
    uris = [str(a), f"file:{b}", f"file://{tmp_path}/missing.jpg", str(tmp_path)]
    got = list(fetch_ordered(uris, StoreSettings(in_flight=2)))
    assert [f.data for _, f in got[:2]] == [b"aaa", b"bb"]
    assert got[0][1].mtime_ms == int(os.stat(a).st_mtime * 1000)
    assert "No such file" in got[2][1].error
    assert got[3][1].error is not None  # a folder is not a photo


def test_stopping_early_cancels_what_was_not_started(proxy, bucket):
    keys = sorted(k for k in bucket if k.startswith("Fetch/Many/"))
    proxy.reset()
    it = fetch_ordered([f"s3a://{BUCKET}/{k}" for k in keys], _settings(proxy, in_flight=2), 2)
    next(it)
    it.close()
    assert proxy.reset().get("GET", 0) < len(keys)


def test_uri_helpers():
    assert split_s3("s3a://b/Test/K iwi/a?b#c.jpg") == ("s3a", "b", "Test/K iwi/a?b#c.jpg")
    assert split_s3("S3://b/k") == ("s3", "b", "k")
    assert (
        is_object_store("s3n://b/k")
        and not is_object_store("file:/a")
        and not (is_object_store("/tmp/s3:x"))
    )


def test_settings_without_spark_follow_boto3s_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    s = store_settings(in_flight=4)
    assert (s.endpoint, s.region, s.path_style, s.in_flight) == (
        "http://127.0.0.1:9", "eu-west-1", True, 4,
    )  # fmt: skip
    assert "secret" not in repr(StoreSettings(secret_key="secret"))


@pytest.mark.parametrize(
    "method, target, kind",
    [
        ("GET", "/bucket?list-type=2&prefix=Test%2F", "LIST"),
        ("GET", "/bucket/", "LIST"),
        ("GET", "/bucket/Test/a.jpg", "GET"),
        ("HEAD", "/bucket/Test/a.jpg", "HEAD"),
        ("GET", "/bucket?location", "OTHER"),
        ("PUT", "/bucket/x", "PUT"),
    ],
)
def test_the_proxy_classifies_s3_requests(method, target, kind):
    assert request_kind(method, target, {}) == kind


def test_path_bytes_batches_fetch_by_path_or_take_sparks_content(tmp_path):
    import pyarrow as pa

    from stages.storage.fetch import ReadError, path_bytes_batches

    files = []
    for i in range(5):
        f = tmp_path / f"{i}.jpg"
        f.write_bytes(bytes([i]) * (i + 1))
        files.append(str(f))
    files.insert(2, str(tmp_path / "gone.jpg"))
    arrow = [pa.record_batch([pa.array(files[:4])], ["path"]),
             pa.record_batch([pa.array(files[4:])], ["path"])]  # fmt: skip
    got = list(path_bytes_batches(arrow, 4, StoreSettings(in_flight=3)))
    assert [p for ps, _ in got for p in ps] == files  # across Arrow batches, in order
    assert [len(ps) for ps, _ in got] == [4, 2]
    contents = [c for _, cs in got for c in cs]
    assert isinstance(contents[2], ReadError) and "No such file" in contents[2]
    assert [c for i, c in enumerate(contents) if i != 2] == [bytes([i]) * (i + 1) for i in range(5)]
    # A view's scanned paths mapped to the real ones before reading.
    mapped = list(path_bytes_batches(
        [pa.record_batch([pa.array(["v0", "v1"])], ["path"])], 8, StoreSettings(),
        to_paths=lambda ps: [files[int(p[1:])] for p in ps],
    ))  # fmt: skip
    assert mapped == [([files[0], files[1]], [b"\x00", b"\x01\x01"])]
    # Without settings: Spark's content column, as read by Spark.
    spark_read = [pa.record_batch([pa.array(["a", "b", "c"]), pa.array([b"1", b"2", b"3"])],
                                  ["path", "content"])]  # fmt: skip
    assert list(path_bytes_batches(spark_read, 2, None)) == [
        (["a", "b"], [b"1", b"2"]), (["c"], [b"3"]),
    ]  # fmt: skip
