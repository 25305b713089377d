"""The options of ``fruits-pipeline emr``: the cluster's, the limits', and each stage's.

:func:`add_cluster_options` and :func:`cluster_options` turn the command line into a
checked :class:`cluster.spec.ClusterOptions` (a bad value is one line, exit 2, before
any AWS call); :func:`add_stage_options` and :func:`stage_argv` give a step exactly the
options its stage accepts, checked as the stage checks them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Collection, Dict, List, Optional, Type

from cluster import guard, sizing, spec
from cluster.budget import new_run_id
from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams, ModelParams, ReduceParams, StageParams, WatchParams

__all__ = [
    "add_cluster_options",
    "add_stage_options",
    "cluster_options",
    "flags",
    "keeps_output",
    "region",
    "run_bucket",
    "stage_argv",
    "stage_params",
]

_SUPPRESS = argparse.SUPPRESS


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _usd(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD") from None


def flags(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``--quiet`` and ``-v`` on every parser, ``--region`` on the leaves.

    A sub-parser's defaults overwrite its parent's, so only the top of a command
    (``bucket``, ``emr``) gives ``--quiet`` and ``-v`` a default; below it the flag
    sets it or leaves it alone.
    """
    p.add_argument(
        "--quiet",
        action="store_true",
        default=False if top else _SUPPRESS,
        help="no progress lines",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else _SUPPRESS,
        help="also detail lines (-vv: and other libraries' debug log)",
    )
    if not top:
        p.add_argument(
            "--region",
            default=_SUPPRESS,
            help=f"AWS region, EU only (default {guard.DEFAULT_REGION})",
        )


def region(args) -> str:
    """``--region``, checked against the EU allow-list (default eu-west-3)."""
    return guard.check_region(getattr(args, "region", None) or guard.DEFAULT_REGION)


def add_cluster_options(
    p: argparse.ArgumentParser, bucket_required: bool, engine_option: bool = True
) -> None:
    g = p.add_argument_group("cluster options")
    if engine_option:  # `emr run` has the featurize stage's own --engine
        g.add_argument(
            "--engine",
            choices=sorted(sizing.PYTHON_WORKER_MIB),
            default="litert",
            help="featurize engine the executors are sized for (default litert; keras "
            "workers need 2 GiB each)",
        )
    g.add_argument(
        "--bucket",
        required=bucket_required,
        default=None,
        help="bucket for code, logs and notebooks"
        + ("" if bucket_required else " (default: the bucket of the paths)"),
    )
    # Values are checked by spec.validate_options: a bad one is a one-line error, exit 2.
    g.add_argument(
        "--instance-type",
        default="m5.large",
        help=f"EC2 type of every node: {', '.join(sizing.INSTANCE_TYPES)} (default m5.large)",
    )
    g.add_argument("--core", type=_int, default=2, help="core nodes (default 2)")
    g.add_argument("--task", type=_int, default=0, help="task nodes (default 0)")
    g.add_argument("--spot", action="store_true", help="task nodes on Spot (needs --task)")
    g.add_argument(
        "--idle-timeout",
        type=_int,
        default=3600,
        help="seconds idle before the cluster ends itself, 60 to 604800 (default 3600)",
    )
    g.add_argument(
        "--max-instances",
        type=_int,
        default=None,
        help="managed scaling: most core+task nodes (default: no scaling)",
    )
    g.add_argument(
        "--notebook", action="store_true", help="JupyterHub + Livy, notebooks in s3://B/jupyter/"
    )
    g.add_argument("--name", default="fruits-pipeline", help="cluster name")
    g.add_argument("--service-role", default="EMR_DefaultRole", help="EMR service role")
    g.add_argument(
        "--job-flow-role", default="EMR_EC2_DefaultRole", help="EC2 instance profile of the nodes"
    )
    g.add_argument("--subnet", default=None, help="EC2 subnet id (default: the default VPC)")
    g.add_argument("--key-name", default=None, help="EC2 key pair for SSH to the primary")
    g.add_argument(
        "--security-configuration", default=None, help="EMR security configuration (encryption)"
    )
    c = p.add_argument_group("cost and access (checked before anything is created)")
    c.add_argument(
        "--images",
        type=_int,
        default=None,
        metavar="N",
        help="image count for the estimate"
        + (" (default: count INPUT's .jpg/.jpeg objects)" if not engine_option else ""),
    )
    c.add_argument(
        "--max-cost",
        type=_usd,
        default=None,
        metavar="USD",
        help="refuse to start above this estimate; AWS terminates the cluster when it may "
        "have spent it (EventBridge Scheduler deadline, kept even if this laptop is closed)",
    )
    c.add_argument(
        "--budget",
        type=_usd,
        default=None,
        metavar="USD",
        help="AWS Budgets COST budget on this run's tag, alerts at 80%% and 100%% of it",
    )
    c.add_argument(
        "--alert-email",
        action="append",
        default=[],
        metavar="ADDR",
        help="where --budget alerts go (repeatable)",
    )
    c.add_argument("--alert-sns", default=None, metavar="TOPIC_ARN", help="or an SNS topic")
    c.add_argument(
        "--ssh-from",
        default=None,
        metavar="CIDR",
        help="open port 22 of the primary node to CIDR (/16 or narrower; `emr down` closes it)",
    )
    c.add_argument(
        "--ssh-from-anywhere",
        action="store_true",
        help="allow --ssh-from 0.0.0.0/0 or ::/0 (the whole internet)",
    )


def cluster_options(args, bucket: Optional[str] = None) -> spec.ClusterOptions:
    """The checked :class:`~cluster.spec.ClusterOptions` of ``args``, with a new run id."""
    return spec.validate_options(
        spec.ClusterOptions(
            bucket=bucket or args.bucket,
            region=region(args),
            instance_type=args.instance_type,
            engine=getattr(args, "engine", None) or "litert",
            core=args.core,
            task=args.task,
            spot=args.spot,
            idle_timeout=args.idle_timeout,
            max_instances=args.max_instances,
            notebook=args.notebook,
            name=args.name,
            service_role=args.service_role,
            job_flow_role=args.job_flow_role,
            subnet_id=args.subnet,
            key_name=args.key_name,
            security_configuration=args.security_configuration,
            run_id=new_run_id(),
            max_cost=args.max_cost,
            budget=args.budget,
            alert_emails=tuple(args.alert_email),
            alert_sns=args.alert_sns,
            ssh_from=args.ssh_from,
            ssh_from_anywhere=args.ssh_from_anywhere,
        )
    )


# ------------------------------------------------------------------ stage options


_STAGE_PARAMS: Dict[str, Type[StageParams]] = {
    "featurize": FeaturizeParams,
    "reduce": ReduceParams,
    "watch": WatchParams,
}
# On EMR the nodes have network: Keras' alpha-1.0 ImageNet weights are the real path.
_EMR_DEFAULTS = {"weights": "imagenet"}
_EMR_HELP = {
    "weights": "imagenet (the default on EMR: Keras download, alpha 1.0), bundled "
    "(alpha 0.35, copied to every node by the bootstrap), random:SEED, "
    "or the path of a .h5 file on the nodes"
}


def add_stage_options(
    p: argparse.ArgumentParser, stage: str, exclude: Collection[str] = ()
) -> None:
    """The stage's own options (the step accepts exactly what the stage does)."""
    _STAGE_PARAMS[stage].add_arguments(p, exclude=exclude, defaults=_EMR_DEFAULTS, helps=_EMR_HELP)


def stage_params(args, stage: str) -> StageParams:
    """The stage's parameters in ``args``: checked as the stage checks them, before a
    step is added (a step that fails at once still costs a cluster's time)."""
    params = _STAGE_PARAMS[stage].from_args(args)
    if isinstance(params, ModelParams) and params.weights == "bundled":
        params = dataclasses.replace(params, **_bundled_on_nodes(params.alpha))
    if isinstance(params, WatchParams) and not params.available_now and params.stop_after is None:
        raise UsageError(
            "a watch step without --available-now or --stop-after never ends and holds "
            "the cluster's step queue: give one of them"
        )
    return params


def stage_argv(args, stage: str) -> List[str]:
    """The stage's options as ``spark-submit`` arguments: those that differ from the
    stage's defaults, which are the node's."""
    return stage_params(args, stage).to_argv()


def _bundled_on_nodes(alpha: Optional[float]) -> Dict[str, Any]:
    """``--weights bundled`` on EMR: the copy the bootstrap put on each node's disk."""
    from stages.featurize.model import BUNDLED_ALPHA, BUNDLED_WEIGHTS

    if alpha not in (None, BUNDLED_ALPHA):
        raise UsageError(
            f"--weights bundled is MobileNetV2 alpha {BUNDLED_ALPHA}, not {alpha}: drop --alpha"
        )
    return {"weights": f"{spec.NODE_WEIGHTS_DIR}/{BUNDLED_WEIGHTS.name}", "alpha": BUNDLED_ALPHA}


def keeps_output(args, stage: str) -> bool:
    """Whether the stage adds to an existing output (so it may, or must, exist)."""
    return bool(
        getattr(args, "incremental", False)
        or (stage == "reduce" and getattr(args, "update", False))
        or stage == "watch"
    )


def run_bucket(args) -> str:
    """``--bucket``, or the one bucket all of the run's paths live in."""
    paths = [args.input, args.results] + ([args.features] if args.features else [])
    buckets = guard.buckets_of(paths)
    if args.bucket:
        return guard.validate_bucket_name(args.bucket)
    if len(buckets) > 1:
        raise UsageError(
            f"the paths span buckets {', '.join(buckets)}: pass --bucket B for the code and logs"
        )
    return buckets[0]
