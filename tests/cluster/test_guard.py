"""cluster.guard: EU regions only, every bucket located in the EU (GDPR)."""

from __future__ import annotations

import boto3
import moto  # a test dependency (pyproject's [test] extra)
import pytest

from cluster import guard
from stages.base.errors import UsageError


@pytest.fixture
def aws(monkeypatch):
    """Fake credentials and moto's in-process AWS."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EMR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    with moto.mock_aws():
        yield


@pytest.mark.parametrize("region", guard.EU_REGIONS)
def test_eu_regions_pass(region):
    assert guard.check_region(region) == region


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-2", "eu-central-2", "il-central-1", ""])
def test_non_eu_regions_are_refused(region):
    with pytest.raises(
        UsageError, match=r"outside the EU allow-list \(GDPR\): use --region eu-west-3"
    ):
        guard.check_region(region)


def test_default_region_is_paris():
    assert guard.DEFAULT_REGION == "eu-west-3"
    assert guard.DEFAULT_REGION in guard.EU_REGIONS


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://fruits-eu/Test/", ("fruits-eu", "Test/")),
        ("s3a://fruits-eu/Test/Apple Braeburn/x.jpg", ("fruits-eu", "Test/Apple Braeburn/x.jpg")),
        ("s3n://fruits-eu", ("fruits-eu", "")),
        ("S3://fruits.eu/a", ("fruits.eu", "a")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert guard.parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri, match",
    [
        ("/data/Test", "is not an S3 URI"),
        ("gs://fruits-eu/Test/", "is not an S3 URI"),
        ("s3://Fruits_EU/Test/", "bucket name 'Fruits_EU' is not valid"),
        ("s3://ab/Test/", "bucket name 'ab' is not valid"),
        ("s3://192.168.0.1/x", "bucket name '192.168.0.1' is not valid"),
        ("s3://a..b/x", r"bucket name 'a\.\.b' is not valid"),
    ],
)
def test_parse_s3_uri_refuses(uri, match):
    with pytest.raises(UsageError, match=match):
        guard.parse_s3_uri(uri)


def test_buckets_of_keeps_first_seen_order_without_duplicates():
    uris = ["s3://b-one/Test/", "s3a://b-two/F/", "s3://b-one/Results/"]
    assert guard.buckets_of(uris) == ["b-one", "b-two"]


class _FakeS3:
    def __init__(self, constraint):
        self.constraint = constraint

    def get_bucket_location(self, Bucket):
        return {"LocationConstraint": self.constraint}


@pytest.mark.parametrize(
    "constraint, region",
    [(None, "us-east-1"), ("", "us-east-1"), ("EU", "eu-west-1"), ("eu-west-3", "eu-west-3")],
)
def test_bucket_region_reads_s3_conventions(constraint, region):
    assert guard.bucket_region(_FakeS3(constraint), "some-bucket") == region


def test_check_bucket_against_moto(aws):
    s3_us = boto3.client("s3", region_name="us-east-1")
    s3_us.create_bucket(Bucket="us-images")
    s3_eu = boto3.client("s3", region_name="eu-west-3")
    s3_eu.create_bucket(
        Bucket="fruits-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"}
    )
    s3_uk = boto3.client("s3", region_name="eu-west-2")
    s3_uk.create_bucket(
        Bucket="fruits-uk", CreateBucketConfiguration={"LocationConstraint": "eu-west-2"}
    )
    assert guard.check_bucket(s3_eu, "fruits-eu") == "eu-west-3"
    with pytest.raises(UsageError, match="bucket us-images is in us-east-1, outside the EU"):
        guard.check_bucket(s3_eu, "us-images")
    with pytest.raises(UsageError, match="bucket fruits-uk is in eu-west-2, outside the EU"):
        guard.check_bucket(s3_eu, "fruits-uk")
    with pytest.raises(UsageError, match="bucket missing-one does not exist: create it with"):
        guard.check_bucket(s3_eu, "missing-one")
    checked = guard.check_buckets(s3_eu, ["s3://fruits-eu/Test/", "s3a://fruits-eu/Results/"])
    assert checked == {"fruits-eu": "eu-west-3"}
    with pytest.raises(UsageError, match="bucket us-images is in us-east-1"):
        guard.check_buckets(s3_eu, ["s3://fruits-eu/Test/"], extra=["us-images"])
