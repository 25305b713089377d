"""``--max-cost``: a termination time kept by AWS, not by the laptop that started the run.

The limit becomes a deadline (:func:`cluster.costs.deadline_seconds`: the limit over the
most the cluster can cost per hour), and the deadline an EventBridge Scheduler one-time
schedule, ``at(...)`` in UTC, whose target is EMR's ``TerminateJobFlows`` on this cluster
(a "universal target": Scheduler calls the API itself, no Lambda to deploy).  Why this:

- it runs on AWS's side, so a closed laptop, a lost network or a killed CLI do not matter,
  and it does not depend on the cluster being healthy (a hung primary node cannot skip it,
  as it could skip a timer in a bootstrap action);
- a step with a timeout would hold EMR's step queue (or, with concurrent steps, keep the
  cluster from ever being idle, defeating ``--idle-timeout``);
- it deletes itself after it fires (``ActionAfterCompletion: DELETE``), and ``emr down``
  deletes it before then; a schedule firing on an ended cluster does nothing.
- cost: EventBridge Scheduler's free tier is 14 million invocations a month, then
  1.00 USD per million (pricing page, as recalled): this is one invocation.

Scheduler calls the target as an IAM role that trusts ``scheduler.amazonaws.com``:
:data:`ROLE_NAME`, created on first use, allowed only ``elasticmapreduce:TerminateJobFlows``
on clusters tagged ``project=fruits-pipeline``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Dict

logger = logging.getLogger(__name__)

__all__ = [
    "DEADLINE_TAG",
    "ROLE_NAME",
    "TARGET_ARN",
    "at_expression",
    "create_deadline",
    "ensure_role",
    "remove_deadline",
    "role_policy",
    "schedule_name",
    "schedule_request",
    "trust_policy",
]

DEADLINE_TAG = "fruits-pipeline:deadline"  # the schedule's name: what `emr down` deletes
ROLE_NAME = "fruits-pipeline-deadline"
TARGET_ARN = "arn:aws:scheduler:::aws-sdk:emr:terminateJobFlows"
# A role made a moment ago is not yet assumable everywhere (IAM is eventually consistent):
# Scheduler refuses it with a ValidationException for a few seconds.
_ROLE_RETRIES = 6
_ROLE_RETRY_S = 5.0


def schedule_name(cluster_id: str) -> str:
    """``fruits-pipeline-j-XXXX``: one schedule per cluster."""
    return f"fruits-pipeline-{cluster_id}"


def at_expression(when: datetime) -> str:
    """``at(2026-12-05T19:30:00)``: Scheduler's one-time expression (UTC, whole seconds)."""
    return f"at({when.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%S})"


def trust_policy(account_id: str) -> Dict[str, Any]:
    """Who may assume the role: EventBridge Scheduler, for schedules of this account."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "scheduler.amazonaws.com"},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"aws:SourceAccount": account_id}},
            }
        ],
    }


def role_policy(account_id: str) -> Dict[str, Any]:
    """What the role may do: terminate this project's clusters, nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "elasticmapreduce:TerminateJobFlows",
                "Resource": f"arn:aws:elasticmapreduce:*:{account_id}:cluster/*",
                "Condition": {"StringEquals": {"aws:ResourceTag/project": "fruits-pipeline"}},
            }
        ],
    }


def ensure_role(iam_client, account_id: str) -> str:
    """The ARN of :data:`ROLE_NAME`, created (with its one permission) if missing."""
    from botocore.exceptions import ClientError

    try:
        return iam_client.get_role(RoleName=ROLE_NAME)["Role"]["Arn"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchEntity":
            raise
    arn = iam_client.create_role(
        RoleName=ROLE_NAME,
        AssumeRolePolicyDocument=json.dumps(trust_policy(account_id)),
        Description="EventBridge Scheduler: terminate a fruits-pipeline cluster at its "
        "--max-cost deadline",
    )["Role"]["Arn"]
    iam_client.put_role_policy(
        RoleName=ROLE_NAME,
        PolicyName="terminate-fruits-pipeline-clusters",
        PolicyDocument=json.dumps(role_policy(account_id)),
    )
    logger.info(f"emr: created IAM role {ROLE_NAME} (Scheduler may terminate our clusters)")
    return arn


def schedule_request(cluster_id: str, when: datetime, role_arn: str) -> Dict[str, Any]:
    """``create_schedule``'s arguments: terminate ``cluster_id`` at ``when``, once."""
    return {
        "Name": schedule_name(cluster_id),
        "Description": f"--max-cost deadline of EMR cluster {cluster_id} (fruits-pipeline)",
        "ScheduleExpression": at_expression(when),
        "ScheduleExpressionTimezone": "UTC",
        "FlexibleTimeWindow": {"Mode": "OFF"},
        "ActionAfterCompletion": "DELETE",
        "State": "ENABLED",
        "Target": {
            "Arn": TARGET_ARN,
            "RoleArn": role_arn,
            "Input": json.dumps({"JobFlowIds": [cluster_id]}),
            # a throttled or failed call is retried for up to an hour
            "RetryPolicy": {"MaximumRetryAttempts": 185, "MaximumEventAgeInSeconds": 3600},
        },
    }


def create_deadline(scheduler_client, cluster_id: str, when: datetime, role_arn: str) -> str:
    """Create the schedule that terminates ``cluster_id`` at ``when``; return its name."""
    from botocore.exceptions import ClientError

    request = schedule_request(cluster_id, when, role_arn)
    for attempt in range(_ROLE_RETRIES):
        try:
            scheduler_client.create_schedule(**request)
            break
        except ClientError as exc:
            retry = exc.response.get("Error", {}).get("Code") == "ValidationException"
            if not retry or attempt == _ROLE_RETRIES - 1:
                raise
            time.sleep(_ROLE_RETRY_S)  # the new role is not assumable yet
    logger.info(
        f"emr: {cluster_id} is terminated by AWS at {when.astimezone(timezone.utc):%H:%M:%S} "
        f"UTC ({request['ScheduleExpression']}, schedule {request['Name']})"
    )
    return request["Name"]


def remove_deadline(scheduler_client, name: str) -> bool:
    """Delete the schedule ``name``; False if it is gone already (it fired, or was removed)."""
    from botocore.exceptions import ClientError

    try:
        scheduler_client.delete_schedule(Name=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return False
        raise
    logger.info(f"emr: deadline schedule {name} deleted")
    return True
