"""``fruits-pipeline bucket notifications BUCKET``: new photos announced on an SQS queue.

Creates (or updates) a queue in the bucket's own region (EU only, checked first), a
queue policy that lets only that bucket, in this account, send to it, and the
bucket's ``ObjectCreated`` notification for the photos' prefix.  ``watch --queue URL``
and ``featurize --incremental --queue URL`` then find new photos without listing the
bucket.

Why no suffix filter: S3 matches a notification's suffix case-sensitively and allows
one suffix per configuration, so ``.jpg``/``.jpeg`` in any case would take 24
configurations (``.JPG``, ``.Jpeg`` ...).  The prefix filter keeps the bucket's other
folders out; the consumer applies the pipeline's one name rule (``.jpg``/``.jpeg`` in
any case, hidden names included), the same as every listing.

The bucket's other notification configurations are kept; ours is replaced by its id.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict

from cluster import emr
from cluster.guard import DEFAULT_REGION, check_bucket, check_region, validate_bucket_name
from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_ID", "queue_policy", "register", "setup_notifications"]

CONFIG_ID = "fruits-pipeline-new-photos"
# SQS keeps a message 4 days by default; 14 (the maximum) leaves a long weekend of
# outage before anything is lost (the reconciliation listing would still find it).
RETENTION_SECONDS = 14 * 24 * 3600
# A received message stays hidden this long: a run commits well within it, and a
# consumer that died has its messages delivered again after it.
VISIBILITY_SECONDS = 900
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


def queue_policy(queue_arn: str, bucket: str) -> Dict[str, Any]:
    """The queue's policy: ``sqs:SendMessage`` for S3, from ``bucket`` of this account only."""
    account = queue_arn.split(":")[4]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "NewPhotosFromTheBucket",
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {
                    "ArnEquals": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"},
                    "StringEquals": {"aws:SourceAccount": account},
                },
            }
        ],
    }


def setup_notifications(
    s3, sqs_for_region, bucket: str, prefix: str = "Test/", queue_name: str = ""
) -> Dict[str, Any]:
    """Create the queue, its policy and the bucket's notification; return what was set.

    Parameters
    ----------
    s3 : boto3 S3 client
    sqs_for_region : callable
        ``region -> boto3 SQS client`` (the queue goes in the bucket's region).
    bucket, prefix : str
    queue_name : str
        Default ``<bucket>-new-photos``.

    Raises
    ------
    UsageError
        A bucket outside the EU or missing, a bad queue name.
    """
    validate_bucket_name(bucket)
    region = check_bucket(s3, bucket)
    name = queue_name or f"{bucket}-new-photos"[:80]
    if not _QUEUE_NAME.match(name):
        raise UsageError(
            f"queue name {name!r} is not valid: 1-80 letters, digits, '-' or '_' (give --queue)"
        )
    prefix = prefix.lstrip("/")
    sqs = sqs_for_region(region)
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "MessageRetentionPeriod": str(RETENTION_SECONDS),
            "VisibilityTimeout": str(VISIBILITY_SECONDS),
            "SqsManagedSseEnabled": "true",
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    # Before the notification: S3 checks that it may send (and sends a test event).
    sqs.set_queue_attributes(
        QueueUrl=url, Attributes={"Policy": json.dumps(queue_policy(arn, bucket))}
    )
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    current.pop("ResponseMetadata", None)
    queues = [q for q in current.get("QueueConfigurations", []) if q.get("Id") != CONFIG_ID]
    ours = {"Id": CONFIG_ID, "QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
    if prefix:
        ours["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    current["QueueConfigurations"] = [*queues, ours]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=current)
    logger.info(f"bucket: s3://{bucket}/{prefix} now announces new objects on {url}")
    return {
        "bucket": bucket,
        "region": region,
        "prefix": prefix,
        "queue_url": url,
        "queue_arn": arn,
        "events": ours["Events"],
        "retention_days": RETENTION_SECONDS // 86400,
    }


def _cmd_notifications(args) -> int:
    region = check_region(getattr(args, "region", None) or DEFAULT_REGION)
    result = setup_notifications(
        emr.client("s3", region),
        lambda r: emr.client("sqs", r),
        args.bucket,
        args.prefix,
        args.queue or "",
    )
    print(json.dumps(result))
    return 0


def register(bucket_sub, flags, aws_errors) -> None:
    """Add ``notifications`` to the ``bucket`` sub-parsers (with the CLI's ``--region``,
    ``--quiet`` flags and its one-line AWS errors)."""
    p = bucket_sub.add_parser(
        "notifications",
        help="announce new photos on an SQS queue (for watch/featurize --queue URL)",
    )
    flags(p)
    p.add_argument("bucket", metavar="BUCKET")
    p.add_argument("--prefix", default="Test/", help="the photos' folder (default Test/)")
    p.add_argument("--queue", default=None, help="queue name (default BUCKET-new-photos)")
    p.set_defaults(func=aws_errors(_cmd_notifications))
