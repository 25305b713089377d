"""A local S3 (moto's server) seen by Spark through Hadoop's real S3A connector.

A test module makes the fixtures its own by assigning them to module-level names
(``s3a_spark = s3_fixtures.s3a_spark``).  They are module-scoped, so that the AWS
environment variables they set are restored, and the server stopped, when that
module's tests are done.

S3A is the connector of Hadoop 3.3 (``hadoop-aws-3.3.1`` and its AWS SDK bundle, from
the sagemaker_pyspark package: see ``conftest.s3a_jars``); on EMR, ``s3://`` goes
through EMRFS instead, which we cannot run here.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.conftest import SAMPLE, s3a_jars

__all__ = [
    "BUCKET",
    "REGION",
    "moto_s3_endpoint",
    "moto_s3_client",
    "s3a_spark",
    "s3a_sample_bucket",
    "list_keys",
    "read_parquet_from_bucket",
    "close_s3a_filesystem",
    "S3A_SETTINGS",
]

BUCKET = "bucket"
# Why an S3A test skips where `make install` did not run (it installs these jars).
S3A_JARS_MISSING = (
    "Hadoop S3A jars not found (hadoop-aws-3.3.1.jar, aws-java-sdk-bundle-1.11.901.jar "
    "from `pip install --no-deps sagemaker_pyspark==1.4.5`, which `make install` runs)"
)


def require_s3a_jars() -> None:
    """Skip the calling test, with :data:`S3A_JARS_MISSING`, where the jars are missing."""
    if not s3a_jars():
        pytest.skip(S3A_JARS_MISSING)


REGION = "eu-west-3"
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}

# Hadoop settings for S3A against a plain-HTTP, path-style local server.  Set on the
# SparkContext's Hadoop configuration at runtime: Spark copies it into every job,
# so the executors see them too.
S3A_SETTINGS: Dict[str, str] = {
    "fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
    "fs.s3a.path.style.access": "true",
    "fs.s3a.connection.ssl.enabled": "false",
    "fs.s3a.access.key": "testing",
    "fs.s3a.secret.key": "testing",
    "fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
    # Fail fast instead of S3A's minutes of retries when something is wrong.
    "fs.s3a.attempts.maximum": "2",
    "fs.s3a.retry.limit": "2",
    "fs.s3a.connection.establish.timeout": "5000",
    "fs.s3a.connection.timeout": "20000",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def list_keys(client, prefix: str) -> List[str]:
    """Every key under ``prefix`` in :data:`BUCKET` (all pages)."""
    keys: List[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def read_parquet_from_bucket(client, prefix: str):
    """The Parquet part files under ``prefix``, fetched with boto3, as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(k for k in list_keys(client, prefix) if k.endswith(".parquet"))
    assert parts, f"no Parquet part files under s3://{BUCKET}/{prefix}"
    tables = [
        pq.read_table(pa.BufferReader(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
        for k in parts
    ]
    return pa.concat_tables(tables)


def close_s3a_filesystem(spark, bucket: str) -> None:
    """Close (and drop from Hadoop's cache) the S3A filesystem of ``bucket``."""
    jvm = spark.sparkContext._jvm
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    jvm.org.apache.hadoop.fs.Path(f"s3a://{bucket}/").getFileSystem(hconf).close()


@pytest.fixture(scope="module")
def moto_s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, a free port; ``AWS_ENDPOINT_URL`` and dummy
    credentials set in this process while the module runs."""
    from moto.server import ThreadedMotoServer  # moto[server]: a test dependency

    # The server's werkzeug logs one line per request: hundreds per test.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(_CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def moto_s3_client(moto_s3_endpoint):
    """boto3 S3 client of the moto server (the endpoint comes from ``AWS_ENDPOINT_URL``)."""
    import boto3

    client = boto3.client("s3", region_name=REGION)
    assert client.meta.endpoint_url == moto_s3_endpoint, "boto3 ignored AWS_ENDPOINT_URL"
    return client


@pytest.fixture(scope="module")
def s3a_spark(spark, moto_s3_endpoint) -> Iterator[object]:
    """The session's SparkSession with S3A pointed at the moto server."""
    require_s3a_jars()
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    settings = dict(S3A_SETTINGS, **{"fs.s3a.endpoint": os.environ["AWS_ENDPOINT_URL"]})
    saved = {k: hconf.get(k) for k in settings}
    for k, v in settings.items():
        hconf.set(k, v)
    try:
        yield spark
    finally:
        # Drop the cached S3A filesystem (it points at a server about to stop).
        try:
            close_s3a_filesystem(spark, BUCKET)
        finally:
            for k, v in saved.items():
                if v is None:
                    hconf.unset(k)
                else:
                    hconf.set(k, v)


def sample_images() -> List[Path]:
    """The bundled sample's ``<Class>/<file>.jpg``."""
    return sorted(SAMPLE.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def s3a_sample_bucket(moto_s3_client) -> List[str]:
    """:data:`BUCKET` in eu-west-3 holding the bundled sample under ``Test/<Class>/``;
    returns the uploaded keys."""
    moto_s3_client.create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    keys = []
    for image in sample_images():
        key = f"Test/{image.parent.name}/{image.name}"
        moto_s3_client.upload_file(str(image), BUCKET, key)
        keys.append(key)
    return keys
