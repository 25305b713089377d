"""A cluster with its limits: the estimate's verdict, then budget, cluster, deadline, SSH.

:func:`cost_limit` runs before any AWS call that creates something (``--max-cost``
below the estimate: one line, exit 2).  :func:`start` then creates, in this order, what
the options ask for: the run's budget (nothing else exists yet if Budgets refuses), the
deadline's IAM role, the cluster, its deadline schedule, its SSH rule; if a step after
the cluster fails, the cluster is terminated at once (a cluster without its deadline
is exactly what ``--max-cost`` promised not to leave).  :func:`teardown` is ``emr down``:
terminate, then remove the schedule and the SSH rule the cluster's tags name.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional

from cluster import budget, costs, deadline, emr, network, wheels
from cluster.package import bootstrap_pins
from cluster.sizing import find_instance_type
from cluster.spec import ClusterOptions
from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "check_architecture",
    "cost_limit",
    "estimate_run",
    "limit_lines",
    "show_estimate",
    "start",
    "teardown",
]


def cost_limit(opts: ClusterOptions, est: costs.Estimate) -> Optional[float]:
    """Seconds from start to the ``--max-cost`` deadline (None without a limit).

    Raises
    ------
    UsageError
        The estimate is above ``--max-cost``, or the limit does not pay for the start-up.
    """
    if opts.max_cost is None:
        return None
    if est.total_usd > opts.max_cost:
        raise UsageError(
            f"estimated {est.total_usd:.2f} USD ({costs.hms(est.total_s)} for "
            f"{est.images:,} images on {1 + opts.core + opts.task} x {opts.instance_type}) "
            f"is above --max-cost {opts.max_cost:.2f}: raise the limit, or run fewer images "
            "or a cheaper cluster (`emr plan` itemises the estimate)"
        )
    seconds = costs.deadline_seconds(opts.max_cost, opts, est)
    if seconds < costs.STARTUP_S:
        raise UsageError(
            f"--max-cost {opts.max_cost:.2f} USD buys {costs.hms(seconds)} of this cluster "
            f"(at most {costs.ceiling_per_hour(opts):.3f} USD/h), less than its "
            f"~{costs.hms(costs.STARTUP_S)} start-up"
        )
    if seconds < est.total_s:
        logger.warning(
            f"emr: note: the deadline ({costs.hms(seconds)} after start, at on-demand prices for "
            f"every node the cluster may grow to) comes before the expected end "
            f"({costs.hms(est.total_s)}): the run may be cut short"
        )
    return seconds


def estimate_run(
    opts: ClusterOptions,
    s3_client,
    images: Optional[int],
    input_uri: Optional[str],
    engine: str,
    alpha: float,
) -> costs.Estimate:
    """The run's estimate: ``images`` (``--images N``), else a count of INPUT (LIST only)."""
    if images is not None:
        if images < 0:
            raise UsageError(f"--images {images} must be 0 or more")
        source = "--images"
    elif input_uri:
        t0 = time.monotonic()
        images, calls = emr.count_images(s3_client, input_uri)
        source = (
            f"counted in {input_uri}: {calls} LIST call{'s' * (calls != 1)}, "
            f"{time.monotonic() - t0:.1f} s; --images N skips the count"
        )
    else:
        images, source = 0, "no --images or --input: start-up alone"
    return costs.estimate(opts, images, source, engine, alpha)


def show_estimate(opts: ClusterOptions, est: costs.Estimate, deadline_s: Optional[float]) -> None:
    """Log the estimate and :func:`limit_lines` (progress lines: ``--quiet`` hides them)."""
    for line in est.lines(opts) + limit_lines(opts, deadline_s):
        logger.info(line)


def limit_lines(opts: ClusterOptions, deadline_s: Optional[float]) -> List[str]:
    """What ``start`` would set up besides the cluster, for ``emr plan`` and the logs."""
    lines = [f"tag: {budget.RUN_TAG}={opts.run_id} on the cluster and its instances"]
    if deadline_s is not None:
        lines.append(
            f"deadline: AWS terminates the cluster {costs.hms(deadline_s)} after start "
            f"(--max-cost {opts.max_cost:.2f} USD at <= {costs.ceiling_per_hour(opts):.3f} "
            f"USD/h), EventBridge Scheduler `at()` schedule, role {deadline.ROLE_NAME}"
        )
    if opts.budget is not None:
        to = ", ".join([*opts.alert_emails, *([opts.alert_sns] if opts.alert_sns else [])])
        lines.append(
            f"budget: {budget.budget_name(opts.run_id or 'RUN')} COST {opts.budget:.2f} USD "
            f"on {budget.RUN_TAG}, actual spend alerts at 80 % and 100 % to {to}"
        )
    if opts.ssh_from:
        cidr = network.check_cidr(opts.ssh_from, opts.ssh_from_anywhere)
        lines.append(
            f"ingress: tcp {network.SSH_PORT} from {cidr} on the primary node's security "
            "group (ElasticMapReduce-master of the cluster's VPC); `emr down` removes it"
        )
    return lines


def check_architecture(opts: ClusterOptions) -> None:
    """Graviton nodes: ask PyPI that every pin has an aarch64 wheel, before a start.

    Raises
    ------
    UsageError
        Naming the first pin without one.
    """
    arch = find_instance_type(opts.instance_type).arch
    if arch == "x86_64":
        return
    pins = bootstrap_pins(arch=arch)
    warning = wheels.require_wheels(pins, arch)
    if warning:
        logger.warning(f"emr: note: {warning}; the bootstrap will tell")
    else:
        logger.info("emr: " + wheels.summary([f"{n}=={v}" for n, v in pins.items()], arch))


def _account(region: str) -> str:
    return emr.client("sts", region).get_caller_identity()["Account"]


def start(opts: ClusterOptions, request: Dict[str, Any], deadline_s: Optional[float]) -> str:
    """Create the budget, the cluster, its deadline and SSH rule; return the cluster id."""
    t0 = datetime.now(timezone.utc)  # the deadline counts from before the request
    account = _account(opts.region) if (opts.budget or deadline_s is not None) else ""
    request = dict(request, Tags=list(request.get("Tags", [])))
    if opts.budget is not None:
        budget_id = budget.create_budget(
            emr.client("budgets", budget.BUDGETS_REGION),
            account,
            opts.run_id or "",
            opts.budget,
            opts.alert_emails,
            opts.alert_sns,
        )
        request["Tags"].append({"Key": budget.BUDGET_TAG, "Value": budget_id})
    role = (
        deadline.ensure_role(emr.client("iam", opts.region), account)
        if deadline_s is not None
        else None
    )
    emr_client = emr.client("emr", opts.region)
    try:
        cluster_id = emr.create_cluster(emr_client, request)
    except BaseException:
        if opts.budget is not None:  # no cluster will ever carry the run's tag
            budgets = emr.client("budgets", budget.BUDGETS_REGION)
            budget.delete_budget(budgets, account, budget_id)
        raise
    try:
        if role is not None and deadline_s is not None:
            when = t0 + timedelta(seconds=deadline_s)
            name = deadline.create_deadline(
                emr.client("scheduler", opts.region), cluster_id, when, role
            )
            emr.add_tags(emr_client, cluster_id, {deadline.DEADLINE_TAG: name})
        if opts.ssh_from:
            cidr = network.check_cidr(opts.ssh_from, opts.ssh_from_anywhere)
            group = network.primary_security_group(emr_client, cluster_id)
            rule = network.add_ssh_rule(
                emr.client("ec2", opts.region), group, cidr, opts.run_id or cluster_id
            )
            if rule:
                emr.add_tags(emr_client, cluster_id, {network.SSH_TAG: rule})
    except BaseException:
        logger.error(f"emr: setting up {cluster_id} failed: terminating it")
        teardown(opts.region, cluster_id)
        raise
    return cluster_id


def teardown(region: str, cluster_id: str) -> Dict[str, Any]:
    """``emr down``: terminate, then delete the deadline and revoke the SSH rule.

    The budget stays: AWS bills reach it hours late, and its 100 % alert may come after
    the cluster has ended (the line says how to delete it).
    """
    emr_client = emr.client("emr", region)
    info = emr.cluster_info(emr_client, cluster_id)
    tags = {t["Key"]: t["Value"] for t in info.get("Tags", [])}
    state = emr.terminate(emr_client, cluster_id)
    out: Dict[str, Any] = {"cluster": cluster_id, "state": state}
    if deadline.DEADLINE_TAG in tags:
        gone = deadline.remove_deadline(
            emr.client("scheduler", region), tags[deadline.DEADLINE_TAG]
        )
        out["deadline_removed"] = tags[deadline.DEADLINE_TAG] if gone else None
    if network.SSH_TAG in tags:
        gone = network.remove_ssh_rule(emr.client("ec2", region), tags[network.SSH_TAG])
        out["ssh_rule_removed"] = tags[network.SSH_TAG] if gone else None
    if budget.BUDGET_TAG in tags:
        name = tags[budget.BUDGET_TAG]
        out["budget_kept"] = name
        logger.info(
            f"emr: budget {name} kept (bills reach it hours late); delete it later with "
            f"`aws budgets delete-budget --account-id ACCOUNT --budget-name {name}`"
        )
    return out
