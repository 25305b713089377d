"""What reading photos from S3 costs, counted by the server's side: moto behind the
counting proxy of benchmarks/s3_latency_proxy.py, Spark's S3A and the workers' boto3
both pointed at the proxy.

featurize from ``s3a://`` makes one GET per photo and no HEAD per object; an
incremental run with nothing new makes no request per old photo; ``--incremental``
and ``watch`` keep ``_``/``.``-named photos as plain featurize does; ``watch`` reads
each new photo once.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Dict, Iterator, List

import pytest

from benchmarks.s3_latency_proxy import LatencyProxy
from tests import s3_fixtures
from tests.conftest import SAMPLE
from tests.s3_fixtures import REGION, S3A_SETTINGS, close_s3a_filesystem

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client
COUNTED = "counted"  # a bucket of its own: the proxy's per-object counts are ours
N_PHOTOS = 12


@pytest.fixture(scope="module")
def proxy(moto_s3_endpoint) -> Iterator[LatencyProxy]:
    with LatencyProxy(moto_s3_endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def counted_spark(spark, proxy, moto_s3_client):
    """The session's SparkSession with S3A pointed at the proxy (and the driver's boto3)."""
    s3_fixtures.require_s3a_jars()
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    settings = dict(S3A_SETTINGS, **{"fs.s3a.endpoint": proxy.endpoint})
    saved = {k: hconf.get(k) for k in settings}
    old_env = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    close_s3a_filesystem(spark, COUNTED)  # a cached one would keep another endpoint
    for k, v in settings.items():
        hconf.set(k, v)
    try:
        yield spark
    finally:
        close_s3a_filesystem(spark, COUNTED)
        os.environ["AWS_ENDPOINT_URL"] = old_env or ""
        for k, v in saved.items():
            if v is None:
                hconf.unset(k)
            else:
                hconf.set(k, v)


@pytest.fixture(scope="module")
def photos(moto_s3_client) -> Dict[str, bytes]:
    """``key -> bytes`` under ``In/``: sample photos, two hidden names, one empty file."""
    moto_s3_client.create_bucket(
        Bucket=COUNTED, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    images = sorted(SAMPLE.glob("*/*.jpg"))[:: 100 // N_PHOTOS][:N_PHOTOS]
    out = {f"In/{p.parent.name}/{p.name}": p.read_bytes() for p in images}
    out["In/Kiwi/_DSC0001.JPG"] = images[0].read_bytes()
    out["In/_Drafts/.hidden.jpeg"] = images[1].read_bytes()
    out["In/Kiwi/empty.jpg"] = b""
    for key, body in out.items():
        moto_s3_client.put_object(Bucket=COUNTED, Key=key, Body=body)
    return out


def _uri(key: str) -> str:
    return f"s3a://{COUNTED}/{key}"


def _object_counts(proxy: LatencyProxy, kind: str, keys) -> Counter:
    """``kind`` requests per object of ``keys`` (the proxy sees URL-quoted paths)."""
    from urllib.parse import unquote

    seen = Counter({unquote(p): n for p, n in proxy.per_object(kind).items()})
    return Counter({k: seen[f"/{COUNTED}/{k}"] for k in keys if seen[f"/{COUNTED}/{k}"]})


@pytest.fixture(scope="module")
def plain(counted_spark, photos, proxy, tmp_path_factory):
    """A plain featurize of ``In/`` (output on local disk): report, rows, requests seen."""
    import pyarrow.parquet as pq

    from stages.featurize import featurize

    out = tmp_path_factory.mktemp("counted") / "features"
    proxy.reset()
    report = featurize(counted_spark, _uri("In/"), str(out), weights="bundled")
    seen = {
        "counts": proxy.snapshot(),
        "get": _object_counts(proxy, "GET", photos),
        "head": _object_counts(proxy, "HEAD", photos),
    }
    rows = pq.read_table(str(out)).to_pylist()
    return report, rows, seen


def test_featurize_from_s3a_is_one_get_per_photo_and_no_head(plain, photos):
    report, rows, seen = plain
    non_empty = [k for k, body in photos.items() if body]
    assert len(rows) == len(photos) == N_PHOTOS + 3
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert errors == {_uri("In/Kiwi/empty.jpg"): "empty file (0 bytes)"}
    # Each photo read with exactly one GET (the empty one with none), none with a HEAD.
    assert seen["get"] == Counter({k: 1 for k in non_empty})
    assert seen["head"] == Counter()
    assert seen["counts"]["GET"] == len(non_empty), seen["counts"]
    # The run's own count (boto3's, in the report) agrees with the server's.
    assert report.requests["GetObject"] == len(non_empty)
    assert report.requests["ListObjectsV2"] >= 2
    assert "HeadObject" not in report.requests
    assert report.images == len(photos) and report.errors == 1


def test_incremental_with_nothing_new_touches_no_old_photo(
    counted_spark, photos, proxy, plain, tmp_path
):
    from stages.featurize.incremental import featurize_incremental

    features = str(tmp_path / "growing")
    proxy.reset()
    first = featurize_incremental(counted_spark, _uri("In/"), features, weights="bundled")
    assert _object_counts(proxy, "GET", photos) == Counter(
        {k: 1 for k, body in photos.items() if body}
    )
    assert _object_counts(proxy, "HEAD", photos) == Counter()
    # One listing rule: the same rows as plain featurize, hidden names included.
    import pyarrow.parquet as pq

    rows = {r["path"]: r["error"] for r in pq.read_table(features).to_pylist()}
    assert rows == {r["path"]: r["error"] for r in plain[1]}
    assert first.new == len(photos) and first.scan == "fetch"

    proxy.reset()
    again = featurize_incremental(counted_spark, _uri("In/"), features, weights="bundled")
    counts = proxy.snapshot()
    assert again.run is None and again.new == again.changed == 0
    assert again.listed == len(photos)
    assert _object_counts(proxy, "GET", photos) == Counter()
    assert _object_counts(proxy, "HEAD", photos) == Counter()
    # LISTs only, and fewer than the photos: the driver's first level, the root's own
    # objects and the ranges of folders, plus S3A's check that INPUT exists.
    assert counts.get("GET", 0) == 0, counts
    assert counts["LIST"] < len(photos), counts
    assert again.requests.get("GetObject", 0) == 0


def test_watch_on_s3_reads_each_new_photo_once_and_keeps_hidden_names(
    counted_spark, photos, proxy, plain, tmp_path
):
    from stages.watch import watch

    features = str(tmp_path / "watched")
    proxy.reset()
    result = watch(counted_spark, _uri("In/"), features, weights="bundled", available_now=True)
    assert result["images"] == len(photos)
    assert _object_counts(proxy, "GET", photos) == Counter(
        {k: 1 for k, body in photos.items() if body}
    )
    assert _object_counts(proxy, "HEAD", photos) == Counter()
    import pyarrow.parquet as pq

    paths: List[str] = pq.read_table(features).column("path").to_pylist()
    assert sorted(paths) == sorted(r["path"] for r in plain[1])
