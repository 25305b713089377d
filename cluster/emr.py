"""boto3 calls: the bucket, the cluster, its steps.

Clients come from ``boto3.client(service, region_name=region)``, so the standard
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables (a moto server, a proxy)
and the usual credential chain apply.  Nothing here checks GDPR: callers run
:mod:`cluster.guard` first, before anything is created.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Sequence, Tuple

from cluster.guard import check_bucket, check_region, parse_s3_uri, validate_bucket_name
from cluster.policy import tls_only_bucket_policy
from cluster.spec import CODE_TAG, step_log_uri
from stages.base.contract import IMAGE_NAME
from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "add_step",
    "add_tags",
    "check_s3_paths",
    "client",
    "cluster_code_uri",
    "cluster_info",
    "count_images",
    "create_bucket",
    "create_cluster",
    "describe",
    "list_step_ids",
    "step_status",
    "terminate",
    "wait_running",
    "wait_step",
]

STEP_DONE = ("COMPLETED", "FAILED", "CANCELLED", "INTERRUPTED")
CLUSTER_DONE = ("TERMINATING", "TERMINATED", "TERMINATED_WITH_ERRORS")


def client(service: str, region: str):
    """A boto3 client for ``service`` in ``region``."""
    import boto3

    return boto3.client(service, region_name=region)


def _code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def create_bucket(s3_client, bucket: str, region: str) -> Dict[str, Any]:
    """Create ``bucket`` in ``region`` (EU only), private, encrypted, TLS-only.

    An existing bucket of yours is checked (EU region) and gets the same settings;
    a name taken by someone else is refused.

    Returns
    -------
    dict
        What was set: bucket, region, public_access_block, encryption, tls_only, created.
    """
    from botocore.exceptions import ClientError

    check_region(region)
    validate_bucket_name(bucket)
    created = True
    try:
        s3_client.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
        )
        logger.info(f"bucket: created s3://{bucket} in {region}")
    except ClientError as exc:
        if _code(exc) == "BucketAlreadyOwnedByYou":
            check_bucket(s3_client, bucket)
            created = False
            logger.info(f"bucket: s3://{bucket} already exists and is yours: applying the settings")
        elif _code(exc) == "BucketAlreadyExists":
            raise UsageError(
                f"bucket name {bucket} is taken by another account: choose another name"
            ) from None
        else:
            raise
    s3_client.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    s3_client.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    s3_client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(tls_only_bucket_policy(bucket)))
    return {
        "bucket": bucket,
        "region": region,
        "created": created,
        "public_access_block": True,
        "encryption": "AES256",
        "tls_only": True,
    }


def create_cluster(emr_client, request: Dict[str, Any]) -> str:
    """``run_job_flow(**request)``; return the cluster id (``j-...``)."""
    resp = emr_client.run_job_flow(**request)
    cluster_id = resp["JobFlowId"]
    release, logs = request.get("ReleaseLabel"), request.get("LogUri")
    logger.info(f"emr: cluster {cluster_id} starting ({release}), logs {logs}")
    return cluster_id


def cluster_info(emr_client, cluster_id: str) -> Dict[str, Any]:
    """``describe_cluster``'s ``Cluster``; a missing id is a :class:`UsageError`."""
    from botocore.exceptions import ClientError

    try:
        return emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    except ClientError as exc:
        if _code(exc) in ("InvalidRequestException", "ResourceNotFoundException"):
            region = emr_client.meta.region_name
            raise UsageError(
                f"no cluster {cluster_id} in {region}: check the id "
                "(`aws emr list-clusters --active`) or pass --region"
            ) from None
        raise


def cluster_code_uri(info: Dict[str, Any]) -> str:
    """The ``s3://B/code/<version>/`` a cluster made by ``emr up`` was bootstrapped with."""
    tags = {t["Key"]: t["Value"] for t in info.get("Tags", [])}
    if CODE_TAG not in tags:
        raise UsageError(
            f"cluster {info.get('Id')} has no {CODE_TAG} tag: it was not started by "
            "`fruits-pipeline emr up`; start one with it"
        )
    return tags[CODE_TAG]


def add_step(emr_client, cluster_id: str, step: Dict[str, Any]) -> str:
    """Add one step to a live cluster; return the step id (``s-...``)."""
    info = cluster_info(emr_client, cluster_id)
    state = info["Status"]["State"]
    if state in CLUSTER_DONE:
        raise UsageError(
            f"cluster {cluster_id} is {state}: start a new one with `fruits-pipeline emr up`"
        )
    step_id = emr_client.add_job_flow_steps(JobFlowId=cluster_id, Steps=[step])["StepIds"][0]
    logger.info(f"emr: step {step_id} ({step['Name']}) added to {cluster_id}")
    return step_id


def step_status(emr_client, cluster_id: str, step_id: str) -> Dict[str, Any]:
    """``{id, name, state, reason, logs}`` of a step."""
    step = emr_client.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
    status = step["Status"]
    failure = status.get("FailureDetails") or {}
    reason = failure.get("Reason") or status.get("StateChangeReason", {}).get("Message")
    info = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    out = {
        "cluster": cluster_id,
        "step": step_id,
        "name": step.get("Name"),
        "state": status["State"],
        "logs": step_log_uri(info.get("LogUri", ""), cluster_id, step_id),
    }
    if reason:
        out["reason"] = reason
    if failure.get("LogFile"):
        out["log_file"] = failure["LogFile"]
    return out


def wait_step(
    emr_client,
    cluster_id: str,
    step_id: str,
    delay: int = 30,
    max_wait_s: float = 24 * 3600,
    round_s: float = 600,
) -> Dict[str, Any]:
    """Wait for a step with the ``step_complete`` waiter; return :func:`step_status`.

    The waiter runs in rounds of ``round_s`` seconds; after each one a line says the
    step's state and the minutes waited.  Returns when the step is COMPLETED, FAILED
    or CANCELLED, or after ``max_wait_s`` with the step still running (the caller
    reads ``state``).
    """
    from botocore.exceptions import WaiterError

    waiter = emr_client.get_waiter("step_complete")
    attempts = max(1, int(round_s // max(delay, 1)))
    t0 = time.monotonic()
    logger.info(
        f"emr: waiting for step {step_id} on {cluster_id} (Ctrl-C stops waiting, not the step)"
    )
    while True:
        try:
            waiter.wait(
                ClusterId=cluster_id,
                StepId=step_id,
                WaiterConfig={"Delay": delay, "MaxAttempts": attempts},
            )
            break
        except WaiterError as exc:
            state = ((exc.last_response or {}).get("Step") or {}).get("Status", {}).get("State")
            if state in STEP_DONE or "Max attempts exceeded" not in str(exc):
                break
            minutes = (time.monotonic() - t0) / 60
            logger.info(f"emr: step {step_id} {state} after {minutes:.0f} min")
            if time.monotonic() - t0 >= max_wait_s:
                break
    return step_status(emr_client, cluster_id, step_id)


def wait_running(emr_client, cluster_id: str, delay: int = 30, max_attempts: int = 60) -> str:
    """Wait (``cluster_running`` waiter) until the cluster is RUNNING or WAITING; return it.

    Raises
    ------
    UsageError
        The cluster ended instead (bad role, no capacity, bootstrap failure): the
        message carries EMR's reason.
    """
    from botocore.exceptions import WaiterError

    logger.info(f"emr: waiting for {cluster_id} to start (bootstrap installs TensorFlow: ~10 min)")
    try:
        emr_client.get_waiter("cluster_running").wait(
            ClusterId=cluster_id, WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts}
        )
    except WaiterError:
        info = cluster_info(emr_client, cluster_id)
        status = info["Status"]
        reason = status.get("StateChangeReason", {}).get("Message", "no reason given")
        raise UsageError(
            f"cluster {cluster_id} did not start: {status['State']}: {reason}; "
            f"see {info.get('LogUri', 'its LogUri')}{cluster_id}/node/ for the bootstrap logs"
        ) from None
    return cluster_info(emr_client, cluster_id)["Status"]["State"]


def describe(emr_client, cluster_id: str) -> Dict[str, Any]:
    """A readable summary of a cluster: state, release, groups, steps, logs, code."""
    info = cluster_info(emr_client, cluster_id)
    groups = emr_client.list_instance_groups(ClusterId=cluster_id).get("InstanceGroups", [])
    steps = emr_client.list_steps(ClusterId=cluster_id).get("Steps", [])
    status = info["Status"]
    tags = {t["Key"]: t["Value"] for t in info.get("Tags", [])}
    summary: Dict[str, Any] = {
        "cluster": info["Id"],
        "name": info.get("Name"),
        "state": status["State"],
        "release": info.get("ReleaseLabel"),
        "region": emr_client.meta.region_name,
        "log_uri": info.get("LogUri"),
        "primary_dns": info.get("MasterPublicDnsName"),
        "normalized_instance_hours": info.get("NormalizedInstanceHours"),
        "instance_groups": [
            {
                "role": g.get("InstanceGroupType"),
                "type": g.get("InstanceType"),
                "market": g.get("Market"),
                "requested": g.get("RequestedInstanceCount"),
                "running": g.get("RunningInstanceCount"),
            }
            for g in groups
        ],
        "steps": [
            {"step": s["Id"], "name": s.get("Name"), "state": s["Status"]["State"]}
            for s in reversed(steps)  # EMR lists the newest first
        ],
        "tags": tags,
    }
    reason = status.get("StateChangeReason", {}).get("Message")
    if reason:
        summary["reason"] = reason
    return summary


def terminate(emr_client, cluster_id: str) -> str:
    """Terminate a cluster; return its state after the call."""
    cluster_info(emr_client, cluster_id)  # a clear error for a wrong id
    emr_client.terminate_job_flows(JobFlowIds=[cluster_id])
    state = cluster_info(emr_client, cluster_id)["Status"]["State"]
    logger.info(f"emr: {cluster_id} {state}")
    return state


def add_tags(emr_client, cluster_id: str, tags: Dict[str, str]) -> None:
    """Tag a cluster (EMR passes the tags on to its instances)."""
    emr_client.add_tags(
        ResourceId=cluster_id, Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
    )


def count_images(s3_client, uri: str) -> Tuple[int, int]:
    """``(images, LIST calls)``: the ``.jpg``/``.jpeg`` objects under ``uri``.

    One ListObjectsV2 page per 1000 objects (~20 ms each: 10 million images are 10,000
    calls, minutes; ``--images N`` skips the count).
    """
    bucket, key = parse_s3_uri(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    images = calls = 0
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        calls += 1
        images += sum(1 for o in page.get("Contents", []) if IMAGE_NAME.match(o["Key"]))
    return images, calls


def list_step_ids(emr_client, cluster_id: str) -> List[str]:
    """Step ids of a cluster, oldest first."""
    steps = emr_client.list_steps(ClusterId=cluster_id).get("Steps", [])
    return [s["Id"] for s in reversed(steps)]


def _has_objects(s3_client, uri: str) -> bool:
    bucket, key = parse_s3_uri(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return resp.get("KeyCount", len(resp.get("Contents", []))) > 0


def check_s3_paths(
    s3_client, inputs: Sequence[str] = (), outputs: Sequence[str] = (), overwrite: bool = False
) -> None:
    """Fail before a cluster spends time: inputs must hold objects, outputs must not.

    Raises
    ------
    UsageError
        An empty input, or an existing output without ``overwrite``.
    """
    for uri in inputs:
        if not _has_objects(s3_client, uri):
            raise UsageError(
                f"input {uri} holds no objects: check the path (upload the data first)"
            )
    if not overwrite:
        for uri in outputs:
            if _has_objects(s3_client, uri):
                raise UsageError(
                    f"output {uri} already exists: pass --overwrite to replace it, "
                    "or choose another path"
                )
