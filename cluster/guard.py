"""GDPR guard: the cluster and every bucket it touches stay in an EU region.

The checks run before anything is created: :func:`check_region` is pure,
:func:`check_bucket` asks S3 where a bucket lives (``GetBucketLocation``).
A refusal is a :class:`~stages.base.errors.UsageError` (one line, exit code 2) that says
how to fix it.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, Iterable, List, Sequence, Tuple

from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REGION",
    "EU_REGIONS",
    "S3_SCHEMES",
    "bucket_region",
    "buckets_of",
    "check_bucket",
    "check_buckets",
    "check_region",
    "parse_s3_uri",
    "validate_bucket_name",
]

DEFAULT_REGION = "eu-west-3"  # Paris

# AWS commercial regions inside the European Union (checked 2026; a new EU region is
# added here by hand, on purpose).  Left out although their names start with "eu-":
#   eu-west-2    London: the United Kingdom is not in the EU (adequacy decision only);
#   eu-central-2 Zurich: Switzerland is not in the EU (adequacy decision only).
# Also left out: the AWS European Sovereign Cloud (a separate partition with its own
# credentials and endpoints, which this tool does not target).
EU_REGIONS: Tuple[str, ...] = (
    "eu-west-1",  # Ireland
    "eu-west-3",  # Paris
    "eu-central-1",  # Frankfurt
    "eu-north-1",  # Stockholm
    "eu-south-1",  # Milan
    "eu-south-2",  # Spain (Aragon)
)

S3_SCHEMES: Tuple[str, ...] = ("s3", "s3a", "s3n")

# S3 general purpose bucket names: 3-63 chars, lower case, digits, dots, hyphens.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z0-9]+)://(?P<bucket>[^/]*)(?:/(?P<key>.*))?$")


def check_region(region: str, allowed: Sequence[str] = EU_REGIONS) -> str:
    """Return ``region`` if it is in ``allowed`` (the EU); raise otherwise.

    Raises
    ------
    UsageError
        The region is outside the EU (``us-east-1``, ``eu-west-2`` London, ...).
    """
    if region not in allowed:
        raise UsageError(
            f"region {region!r} is outside the EU allow-list (GDPR): use --region "
            f"{DEFAULT_REGION} or one of {', '.join(allowed)}"
        )
    return region


def validate_bucket_name(bucket: str) -> str:
    """Return ``bucket`` if it is a valid S3 bucket name; raise otherwise."""
    if (
        not _BUCKET_RE.match(bucket or "")
        or ".." in bucket
        or _IP_RE.match(bucket)
        or bucket.startswith("xn--")
    ):
        raise UsageError(
            f"bucket name {bucket!r} is not valid: use 3-63 lower-case letters, digits, "
            "hyphens or dots, starting and ending with a letter or digit"
        )
    return bucket


def parse_s3_uri(uri: str) -> Tuple[str, str]:
    """``s3://bucket/key`` (also ``s3a://``, ``s3n://``) to ``(bucket, key)``.

    Raises
    ------
    UsageError
        Not an S3 URI, or a bad bucket name.
    """
    m = _URI_RE.match(uri or "")
    if not m or m.group("scheme").lower() not in S3_SCHEMES:
        raise UsageError(
            f"{uri!r} is not an S3 URI: on EMR, inputs and outputs are s3://BUCKET/PREFIX/"
        )
    return validate_bucket_name(m.group("bucket")), m.group("key") or ""


def buckets_of(uris: Iterable[str]) -> List[str]:
    """The distinct buckets of ``uris``, in first-seen order."""
    seen: Dict[str, None] = {}
    for uri in uris:
        seen.setdefault(parse_s3_uri(uri)[0], None)
    return list(seen)


def bucket_region(s3_client, bucket: str) -> str:
    """Where ``bucket`` lives, from ``GetBucketLocation``.

    S3 answers an empty (``None``) LocationConstraint for us-east-1 and, for old
    buckets, ``EU`` for eu-west-1.

    Raises
    ------
    UsageError
        No such bucket, or no permission to ask.
    """
    from botocore.exceptions import ClientError

    try:
        resp = s3_client.get_bucket_location(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404", "NotFound"):
            raise UsageError(
                f"bucket {bucket} does not exist: create it with "
                f"`fruits-pipeline bucket create {bucket} --region {DEFAULT_REGION}`"
            ) from None
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            raise UsageError(
                f"cannot read the location of bucket {bucket} (AccessDenied): grant "
                "s3:GetBucketLocation to these credentials, or use a bucket you own"
            ) from None
        raise
    constraint = resp.get("LocationConstraint") or "us-east-1"
    return "eu-west-1" if constraint == "EU" else constraint


def check_bucket(s3_client, bucket: str, allowed: Sequence[str] = EU_REGIONS) -> str:
    """Return the region of ``bucket`` if it is in ``allowed``; raise otherwise.

    Raises
    ------
    UsageError
        The bucket is missing, unreadable, or located outside the EU.
    """
    region = bucket_region(s3_client, validate_bucket_name(bucket))
    if region not in allowed:
        raise UsageError(
            f"bucket {bucket} is in {region}, outside the EU (GDPR): copy the data to a "
            f"bucket in {DEFAULT_REGION} (`fruits-pipeline bucket create NAME`) and use that"
        )
    logger.debug("guard: bucket %s is in %s: in the EU", bucket, region)
    return region


def check_buckets(
    s3_client, uris: Iterable[str], extra: Iterable[str] = (), allowed: Sequence[str] = EU_REGIONS
) -> Dict[str, str]:
    """Check the bucket of every URI in ``uris`` plus the buckets named in ``extra``.

    Returns
    -------
    dict
        bucket -> region, for every bucket checked.
    """
    buckets = buckets_of(uris)
    for b in extra:
        if b not in buckets:
            buckets.append(validate_bucket_name(b))
    return {b: check_bucket(s3_client, b, allowed) for b in buckets}
