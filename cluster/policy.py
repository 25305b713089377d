"""Least-privilege S3 policy for the cluster's EC2 instance profile.

``fruits-pipeline emr policy --bucket B`` prints it.  Attach it to the role behind
``EMR_EC2_DefaultRole`` *instead of* the S3 wildcard of the managed
``AmazonElasticMapReduceforEC2Role`` policy: the nodes then reach only this bucket,
and in it only these prefixes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from cluster.guard import validate_bucket_name
from stages.base.errors import UsageError

__all__ = [
    "READ_PREFIXES",
    "WRITE_PREFIXES",
    "instance_profile_policy",
    "new_photos_queue",
    "tls_only_bucket_policy",
]

# Read-only: the images and the code.  Features/ is both written (stage 1) and read (stage 2).
READ_PREFIXES = ("Test/", "code/")
WRITE_PREFIXES = ("Features/", "Results/", "logs/", "jupyter/")


def _norm(prefix: str) -> str:
    p = prefix.strip("/")
    if not p or "*" in p or "?" in p:
        raise UsageError(f"prefix {prefix!r} is not valid: give a folder like Test/ (no wildcards)")
    return p + "/"


def instance_profile_policy(
    bucket: str,
    read_prefixes: Sequence[str] = READ_PREFIXES,
    write_prefixes: Sequence[str] = WRITE_PREFIXES,
) -> Dict[str, Any]:
    """IAM policy document (a dict) limited to ``bucket``'s prefixes.

    - ``s3:ListBucket`` on the bucket, only for keys under the prefixes
      (``s3:prefix`` condition);
    - ``s3:GetObject`` under every prefix (a writer reads back what it wrote);
    - ``s3:PutObject``, ``s3:DeleteObject`` and multipart clean-up under the write
      prefixes only, plus the ``<prefix>_$folder$`` markers that EMRFS writes beside
      a folder.

    To check on AWS before relying on it: S3 answers a HEAD of a *missing* key with
    404 only to a caller allowed ``s3:ListBucket``; whether the ``s3:prefix``
    condition counts for that check is not documented.  If Spark's "does the output
    exist" test fails with 403/AccessDenied, drop the condition (the nodes then see
    the key names, not the contents, of the other prefixes).

    Raises
    ------
    UsageError
        Bad bucket name, or a prefix that is empty or holds a wildcard.
    """
    validate_bucket_name(bucket)
    reads = [_norm(p) for p in read_prefixes]
    writes = [_norm(p) for p in write_prefixes]
    every = list(dict.fromkeys(reads + writes))
    bucket_arn = f"arn:aws:s3:::{bucket}"
    list_prefixes: List[str] = []
    for p in every:
        list_prefixes += [p.rstrip("/"), p, p + "*"]
    write_objects = [f"{bucket_arn}/{p}*" for p in writes] + [
        f"{bucket_arn}/{p.rstrip('/')}_$folder$" for p in writes
    ]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListOwnPrefixes",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [bucket_arn],
                "Condition": {"StringLike": {"s3:prefix": list_prefixes}},
            },
            {
                "Sid": "BucketLocation",
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation"],
                "Resource": [bucket_arn],
            },
            {
                "Sid": "ReadOwnPrefixes",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"{bucket_arn}/{p}*" for p in every],
            },
            {
                "Sid": "WriteOutputs",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": write_objects,
            },
            {
                # `watch --queue` / `featurize --incremental --queue` on the nodes: the
                # queue `fruits-pipeline bucket notifications` makes for this bucket.
                "Sid": "ConsumeNewPhotoEvents",
                "Effect": "Allow",
                "Action": [
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                    "sqs:ChangeMessageVisibility",
                    "sqs:GetQueueAttributes",
                    "sqs:GetQueueUrl",
                ],
                "Resource": [f"arn:aws:sqs:*:*:{new_photos_queue(bucket)}"],
            },
        ],
    }


def new_photos_queue(bucket: str) -> str:
    """The default name of the queue of ``bucket``'s new-photo events."""
    return f"{bucket}-new-photos"[:80]


def tls_only_bucket_policy(bucket: str) -> Dict[str, Any]:
    """Bucket policy that denies every request not made over TLS."""
    validate_bucket_name(bucket)
    arn = f"arn:aws:s3:::{bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [arn, f"{arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }
