"""The executors' S3 listing (moto behind the counting proxy): every photo once, hidden
names included, sizes and whole-second times from the LIST itself, LISTs only."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

from benchmarks.s3_latency_proxy import LatencyProxy
from stages.base.contract import IMAGE_NAME
from stages.storage.fetch import StoreSettings
from stages.storage.s3list import CountsParam, list_flat, listing_frame
from tests import s3_fixtures
from tests.s3_fixtures import REGION

pytestmark = [pytest.mark.cluster]

moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client
LISTED = "listed"  # a bucket of its own: other modules' objects never show up

KEYS = {
    "In/Kiwi/a.jpg": b"a" * 10,
    "In/Kiwi/_DSC0001.JPG": b"b" * 11,
    "In/Kiwi/.dot.jpeg": b"c" * 12,
    "In/_Drafts/x.jpg": b"d" * 13,
    "In/Apple Braeburn/été 1+1%.jpg": b"e" * 14,
    "In/Kiwi/deep/er/z.Jpg": b"f" * 15,
    "In/top.jpg": b"g" * 16,
    "In/Kiwi/empty.jpg": b"",
    "In/Kiwi/notes.txt": b"not a photo",
    "In/Kiwi/": b"",  # a folder marker
    "Inside/other.jpg": b"h",  # shares the prefix's characters, not its folder
}
MANY = 1005  # one folder over a page of 1000 keys


@pytest.fixture(scope="module")
def proxy(moto_s3_endpoint) -> Iterator[LatencyProxy]:
    with LatencyProxy(moto_s3_endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def settings(proxy) -> StoreSettings:
    return StoreSettings(
        endpoint=proxy.endpoint, region=REGION, path_style=True,
        access_key="testing", secret_key="testing",
    )  # fmt: skip


@pytest.fixture(scope="module")
def bucket(moto_s3_client):
    moto_s3_client.create_bucket(
        Bucket=LISTED, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    for key, body in KEYS.items():
        moto_s3_client.put_object(Bucket=LISTED, Key=key, Body=body)

    def put(i: int) -> None:
        moto_s3_client.put_object(Bucket=LISTED, Key=f"Many/Lemon/{i:05d}.jpg", Body=b"x")

    with ThreadPoolExecutor(8) as pool:  # clients are thread-safe; 8 at a time is 4x faster
        list(pool.map(put, range(MANY)))
    return KEYS


def _expected(client, prefix):
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=LISTED, Prefix=prefix):
        for obj in page.get("Contents", []):
            if IMAGE_NAME.match(obj["Key"].rsplit("/", 1)[-1]):
                out[f"s3a://{LISTED}/{obj['Key']}"] = (obj["Size"], obj["LastModified"])
    return out


def test_every_photo_listed_once_with_lists_only(spark, bucket, moto_s3_client, proxy, settings):
    counts = spark.sparkContext.accumulator({}, CountsParam())
    proxy.reset()
    rows = listing_frame(spark, f"s3a://{LISTED}/In", settings, IMAGE_NAME, counts).collect()
    seen = proxy.snapshot()
    expected = _expected(moto_s3_client, "In/")
    got = {r.path: (r.length, r.modificationTime) for r in rows}
    assert sorted(got) == sorted(_expected(moto_s3_client, "In/"))
    assert len(rows) == len(got) == 8  # hidden names, deep folders, the empty file
    assert got.keys() == expected.keys()
    for path, (size, stamp) in expected.items():
        assert got[path][0] == size
        utc = stamp.astimezone(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
        assert got[path][1] == utc  # whole seconds, UTC (the session's zone)
    # The driver's first level (1), the root's own objects (1), one per sub-folder (3).
    assert seen == {"LIST": 5}, seen
    assert counts.value == {"ListObjectsV2": 4}


def test_a_folder_over_a_page_takes_a_list_per_page(spark, bucket, proxy, settings):
    proxy.reset()
    n = listing_frame(spark, f"s3://{LISTED}/Many/", settings, IMAGE_NAME).count()
    assert n == MANY
    assert proxy.snapshot() == {"LIST": 1 + 1 + 2}


def test_ranges_of_small_folders_list_each_photo_once(spark, bucket, moto_s3_client, proxy,
                                                       settings):  # fmt: skip
    # 30 folders of 2 photos, with names that sort between a folder and its prefix
    # ("F01-b/" and "F01.jpg" between "F01" and "F01/"): each listed once, by ranges.
    keys = [f"Ranges/F{i:02d}/{j}.jpg" for i in range(30) for j in range(2)]
    keys += ["Ranges/F01-b/x.jpg", "Ranges/F01.jpg", "Ranges/F01.b/y.jpg", "Ranges/zz.jpg"]
    for key in keys:
        moto_s3_client.put_object(Bucket=LISTED, Key=key, Body=b"1")
    proxy.reset()
    rows = listing_frame(spark, f"s3a://{LISTED}/Ranges/", settings, IMAGE_NAME).collect()
    assert sorted(r.path for r in rows) == sorted(f"s3a://{LISTED}/{k}" for k in keys)
    ranges = 4 * spark.sparkContext.defaultParallelism
    assert proxy.snapshot() == {"LIST": 1 + 1 + ranges}  # not one per folder (32)


def test_flat_listing_keeps_the_scheme_and_the_key_as_is(bucket, settings):
    got = {p for p, _, _ in list_flat(f"s3n://{LISTED}/In/Apple Braeburn/", settings)}
    assert got == {f"s3n://{LISTED}/In/Apple Braeburn/été 1+1%.jpg"}


def test_an_empty_or_missing_prefix_lists_nothing(spark, bucket, settings):
    assert listing_frame(spark, f"s3a://{LISTED}/Nope/", settings).count() == 0
