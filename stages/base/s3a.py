"""``s3a://`` from a laptop: Hadoop's S3A connector jars and settings that follow boto3.

pyspark's own jars have no S3 connector.  The project takes Hadoop's (``hadoop-aws``
3.3.1 and the AWS SDK bundle it was built against) from the PyPI package
``sagemaker_pyspark==1.4.5``, installed with ``--no-deps`` by ``make install`` (its
metadata pins pyspark 3.3.0, which we must not get).  Maven is not used: it is not
reachable everywhere this runs, and PyPI is.  The jars are checked against their
SHA-256 before Spark loads them.

On EMR, ``s3://`` goes through EMRFS and none of this is used.

Endpoint, region and credentials are resolved by boto3 itself, so S3A reaches
exactly what ``aws s3`` and boto3 reach: ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the profile), then the usual chain
(environment, ``AWS_PROFILE`` and ``~/.aws``, SSO, container, instance metadata).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import cache
from typing import Dict, Iterable, List, Tuple
from urllib.parse import urlparse

from stages.base.errors import UsageError

__all__ = ["S3A_JARS", "find_jars", "needs_s3a", "s3a_conf"]

# name -> SHA-256 of the file shipped in sagemaker_pyspark 1.4.5.
S3A_JARS: Dict[str, str] = {
    "hadoop-aws-3.3.1.jar": "6be50ad8a8b445d2802381b085b2a3ede5c29d353450a6a21f16b2fefa962b6e",
    "aws-java-sdk-bundle-1.11.901.jar": (
        "b87175b32a16544cc1b37cf40390eb375833e62bed67f8ce6cde4b7ad6429ead"
    ),
}
_HOW = (
    "install them with `pip install --no-deps sagemaker_pyspark==1.4.5` (`make install` does), "
    "or run on EMR with s3:// paths"
)
DEFAULT_REGION = "eu-west-3"


def needs_s3a(paths: Iterable[object]) -> bool:
    """Whether any of ``paths`` is an ``s3a://`` URI."""
    return any(isinstance(p, str) and p.lower().startswith("s3a://") for p in paths)


def _jar_dir() -> str:
    # Found without importing the package (its import pulls in its own pyspark checks).
    spec = importlib.util.find_spec("sagemaker_pyspark")
    if spec is None or spec.origin is None:
        return ""
    return os.path.join(os.path.dirname(spec.origin), "jars")


@cache
def _sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_jars(verify: bool = True) -> List[str]:
    """Paths of the S3A connector jars, checked against :data:`S3A_JARS`.

    Raises
    ------
    UsageError
        A jar is missing or is not the pinned file; the message says how to get it.
    """
    folder = _jar_dir()
    paths = []
    for name, expected in S3A_JARS.items():
        path = os.path.join(folder, name) if folder else ""
        if not path or not os.path.isfile(path):
            raise UsageError(f"s3a:// needs Hadoop's S3A connector jar {name}: {_HOW}")
        if verify:
            st = os.stat(path)
            if _sha256(path, st.st_size, st.st_mtime) != expected:
                raise UsageError(f"{path} is not the pinned {name} (SHA-256 differs): {_HOW}")
        paths.append(path)
    return paths


def _endpoint_and_region() -> Tuple[str, str]:
    import boto3

    session = boto3.Session()
    region = session.region_name or DEFAULT_REGION
    client = session.client("s3", region_name=region)
    return client.meta.endpoint_url, region


def s3a_conf() -> Dict[str, str]:
    """Spark settings that load the S3A connector and point it where boto3 points.

    Returns
    -------
    dict
        ``spark.jars`` and ``spark.hadoop.fs.s3a.*`` entries; give them to
        :func:`stages.base.session.spark_session` (they must be set before the JVM starts).
    """
    import boto3

    conf = {
        "spark.jars": ",".join(find_jars()),
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
    }
    endpoint, region = _endpoint_and_region()
    url = urlparse(endpoint)
    if url.hostname and not url.hostname.endswith("amazonaws.com"):
        # A local or third-party S3 (MinIO, moto, Ceph): path-style, TLS as the URL says.
        conf["spark.hadoop.fs.s3a.endpoint"] = endpoint
        conf["spark.hadoop.fs.s3a.path.style.access"] = "true"
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(url.scheme == "https").lower()
    conf["spark.hadoop.fs.s3a.endpoint.region"] = region
    creds = boto3.Session().get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        conf["spark.hadoop.fs.s3a.access.key"] = frozen.access_key
        conf["spark.hadoop.fs.s3a.secret.key"] = frozen.secret_key
        provider = "SimpleAWSCredentialsProvider"
        if frozen.token:
            conf["spark.hadoop.fs.s3a.session.token"] = frozen.token
            provider = "TemporaryAWSCredentialsProvider"
        conf["spark.hadoop.fs.s3a.aws.credentials.provider"] = (
            f"org.apache.hadoop.fs.s3a.{provider}"
        )
    # Without credentials, S3A's own chain applies (instance profile on EC2).
    return conf
