"""SSH to the primary node: one inbound rule, opened only as far as asked, removed by ``down``.

``emr up --ssh-from CIDR`` adds an inbound rule for TCP port 22 from ``CIDR`` to the
primary node's security group (the EMR-managed one, ``ElasticMapReduce-master`` of the
cluster's VPC, whose id the cluster reports once it is starting) and records the rule's
id in the cluster's tag :data:`SSH_TAG`; ``emr down`` revokes that rule.  A rule that
was already there is left alone and not recorded: ``down`` removes only what ``up``
added.  :func:`check_cidr` is pure; the others take a boto3 EC2 or EMR client.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any, Dict, Optional

from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_PREFIX",
    "SSH_PORT",
    "SSH_TAG",
    "add_ssh_rule",
    "check_cidr",
    "ingress_permission",
    "primary_security_group",
    "remove_ssh_rule",
]

SSH_PORT = 22
SSH_TAG = "fruits-pipeline:ssh-rule"  # "sg-.../sgr-...": what `emr down` revokes
MIN_PREFIX = 16  # a /16 is 65,536 addresses: anything wider is not "my network"


def check_cidr(cidr: str, anywhere: bool = False) -> str:
    """``cidr`` as a network (``203.0.113.7`` -> ``203.0.113.7/32``); raise if too wide.

    Raises
    ------
    UsageError
        Not an address or network; ``0.0.0.0/0`` or ``::/0`` without ``anywhere``;
        a prefix shorter than :data:`MIN_PREFIX` (other than those two).
    """
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise UsageError(
            f"--ssh-from {cidr!r} is not an IP address or CIDR (e.g. 203.0.113.7/32; "
            "`curl -s https://checkip.amazonaws.com` prints your address)"
        ) from None
    if net.prefixlen == 0:
        if not anywhere:
            raise UsageError(
                f"--ssh-from {cidr} opens SSH to the whole internet: give your own address "
                "(e.g. 203.0.113.7/32), or add --ssh-from-anywhere if you really mean it"
            )
        return str(net)
    if net.prefixlen < MIN_PREFIX:
        raise UsageError(
            f"--ssh-from {cidr} is a /{net.prefixlen}, wider than /{MIN_PREFIX} "
            f"({net.num_addresses:,} addresses): give your own address or network"
        )
    return str(net)  # 203.0.113.7/24 -> 203.0.113.0/24: what the rule will say


def ingress_permission(cidr: str, run_id: str) -> Dict[str, Any]:
    """The ``IpPermissions`` item of the rule: TCP 22 from ``cidr`` (IPv4 or IPv6)."""
    net = ipaddress.ip_network(cidr, strict=False)
    desc = f"fruits-pipeline ssh, run {run_id}"
    ranges = (
        {"IpRanges": [{"CidrIp": str(net), "Description": desc}]}
        if net.version == 4
        else {"Ipv6Ranges": [{"CidrIpv6": str(net), "Description": desc}]}
    )
    return {"IpProtocol": "tcp", "FromPort": SSH_PORT, "ToPort": SSH_PORT, **ranges}


def primary_security_group(
    emr_client, cluster_id: str, delay: float = 10.0, max_wait_s: float = 600.0
) -> str:
    """The primary node's EMR-managed security group, once the cluster reports it.

    EMR creates ``ElasticMapReduce-master`` in the cluster's VPC (first cluster there)
    and names it in ``Ec2InstanceAttributes`` while the cluster starts.

    Raises
    ------
    UsageError
        The cluster ended, or named no group within ``max_wait_s``.
    """
    t0 = time.monotonic()
    while True:
        info = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
        group = (info.get("Ec2InstanceAttributes") or {}).get("EmrManagedMasterSecurityGroup")
        if group:
            return group
        state = info["Status"]["State"]
        if state.startswith("TERMINAT") or time.monotonic() - t0 >= max_wait_s:
            raise UsageError(
                f"cluster {cluster_id} ({state}) named no primary security group within "
                f"{max_wait_s:.0f} s: SSH not opened"
            )
        time.sleep(delay)


def add_ssh_rule(ec2_client, group_id: str, cidr: str, run_id: str) -> Optional[str]:
    """Open TCP 22 from ``cidr`` on ``group_id``; return ``"sg-.../sgr-..."``.

    Returns None when the same rule was already there (then it is not ours to remove).
    """
    from botocore.exceptions import ClientError

    try:
        resp = ec2_client.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=[ingress_permission(cidr, run_id)],
            TagSpecifications=[
                {
                    "ResourceType": "security-group-rule",
                    "Tags": [{"Key": "fruits-pipeline:run", "Value": run_id}],
                }
            ],
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidPermission.Duplicate":
            logger.info(f"emr: {group_id} already lets {cidr} in on port 22: left as it is")
            return None
        raise
    rule = resp["SecurityGroupRules"][0]["SecurityGroupRuleId"]
    logger.info(f"emr: port 22 open from {cidr} on {group_id} (rule {rule}); `emr down` closes it")
    return f"{group_id}/{rule}"


def remove_ssh_rule(ec2_client, recorded: str) -> bool:
    """Revoke the rule :func:`add_ssh_rule` recorded; False if it was already gone."""
    from botocore.exceptions import ClientError

    group_id, _, rule = recorded.partition("/")
    try:
        ec2_client.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=[rule])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in (
            "InvalidSecurityGroupRuleId.NotFound",
            "InvalidPermission.NotFound",
            "InvalidGroup.NotFound",
        ):
            return False
        raise
    logger.info(f"emr: SSH rule {rule} removed from {group_id}")
    return True
