"""``fruits-pipeline bucket ...`` and ``fruits-pipeline emr ...``: the pipeline on AWS EMR.

::

    fruits-pipeline bucket create B [--region eu-west-3]
    fruits-pipeline emr plan --bucket B [cluster options]     # prints the request, creates nothing
    fruits-pipeline emr up --bucket B [cluster options]       # prints the cluster id
    fruits-pipeline emr submit CLUSTER featurize s3://B/Test/ s3://B/Features/ [options]
    fruits-pipeline emr submit CLUSTER reduce s3://B/Features/ s3://B/Results/ --k 50
    fruits-pipeline emr submit CLUSTER featurize s3://B/Test/ s3://B/Features/ --incremental
    fruits-pipeline emr submit CLUSTER reduce s3://B/Features/ s3://B/Results/ --update
    fruits-pipeline emr submit CLUSTER watch s3://B/Test/ s3://B/Features/ --available-now
    fruits-pipeline emr run s3://B/Test/ s3://B/Results/ [cluster and stage options]
    fruits-pipeline emr status CLUSTER | emr down CLUSTER | emr policy --bucket B

The GDPR guard runs first: a region or a bucket outside the EU is refused with exit
code 2 before anything is created or uploaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from typing import Any, Callable, Collection, Dict, List, Optional, Type

from cluster import guard, sizing, spec
from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams, ModelParams, ReduceParams, StageParams, WatchParams

__all__ = ["register"]

logger = logging.getLogger(__name__)

_SUPPRESS = argparse.SUPPRESS


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _aws_errors(fn: Callable[[Any], int]) -> Callable[[Any], int]:
    """Turn AWS's refusals (credentials, permissions, validation) into one-line errors."""

    @functools.wraps(fn)
    def run(args) -> int:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(args)
        except NoCredentialsError:
            raise UsageError(
                "no AWS credentials: run `aws configure`, or set AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise UsageError(
                f"AWS refused {exc.operation_name}: {err.get('Code', '?')}: "
                f"{err.get('Message', '').strip() or 'no message'}"
            ) from None
        except BotoCoreError as exc:
            raise UsageError(f"AWS call failed: {exc}") from None

    return run


def _flags(p: argparse.ArgumentParser, top: bool = False) -> None:
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


def _region(args) -> str:
    return guard.check_region(getattr(args, "region", None) or guard.DEFAULT_REGION)


def _add_cluster_options(
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


def _options(args, bucket: Optional[str] = None) -> spec.ClusterOptions:
    return spec.validate_options(
        spec.ClusterOptions(
            bucket=bucket or args.bucket,
            region=_region(args),
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


def _add_stage_options(
    p: argparse.ArgumentParser, stage: str, exclude: Collection[str] = ()
) -> None:
    """The stage's own options (the step accepts exactly what the stage does)."""
    _STAGE_PARAMS[stage].add_arguments(p, exclude=exclude, defaults=_EMR_DEFAULTS, helps=_EMR_HELP)


def _stage_params(args, stage: str) -> StageParams:
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


def _stage_argv(args, stage: str) -> List[str]:
    """The stage's options as ``spark-submit`` arguments: those that differ from the
    stage's defaults, which are the node's."""
    return _stage_params(args, stage).to_argv()


def _bundled_on_nodes(alpha: Optional[float]) -> Dict[str, Any]:
    """``--weights bundled`` on EMR: the copy the bootstrap put on each node's disk."""
    from stages.featurize.model import BUNDLED_ALPHA, BUNDLED_WEIGHTS

    if alpha not in (None, BUNDLED_ALPHA):
        raise UsageError(
            f"--weights bundled is MobileNetV2 alpha {BUNDLED_ALPHA}, not {alpha}: drop --alpha"
        )
    return {"weights": f"{spec.NODE_WEIGHTS_DIR}/{BUNDLED_WEIGHTS.name}", "alpha": BUNDLED_ALPHA}


def _keeps_output(args, stage: str) -> bool:
    """Whether the stage adds to an existing output (so it may, or must, exist)."""
    return bool(
        getattr(args, "incremental", False)
        or (stage == "reduce" and getattr(args, "update", False))
        or stage == "watch"
    )


# ------------------------------------------------------------------ commands


def _print_json(obj: Any, indent: Optional[int] = None) -> None:
    print(json.dumps(obj, indent=indent, default=str))


def _cmd_bucket_create(args) -> int:
    from cluster import emr

    region = _region(args)
    guard.validate_bucket_name(args.bucket)
    result = emr.create_bucket(emr.client("s3", region), args.bucket, region)
    _print_json(result)
    return 0


def _cmd_plan(args) -> int:
    from cluster import emr
    from cluster.package import build_bundle, emr_notebook

    opts = _options(args)
    # The same checks as `up`, in the same order: a plan that `up` would refuse is refused.
    s3 = emr.client("s3", opts.region)
    _same_region(guard.check_bucket(s3, opts.bucket), opts)
    if opts.notebook:
        emr_notebook(opts.bucket)  # `up` refuses a missing notebook before uploading: so do we
    bundle = build_bundle()
    request = spec.build_request(opts, bundle.uri(opts.bucket))
    cost = spec.hourly_cost(opts)
    logger.info(
        f"emr plan: {cost['nodes']} x {opts.instance_type} in {opts.region}, "
        f"~{cost['total_usd']:.3f} USD/h on-demand (EC2 {cost['ec2_usd']:.3f} + EMR "
        f"{cost['emr_usd']:.3f}; prices are assumptions, see cluster/sizing.py); nothing created"
    )
    _print_json(request, indent=2)
    return 0


def _upload_code(args, opts: spec.ClusterOptions, s3) -> str:
    from cluster.package import build_bundle, emr_notebook, upload_bundle, upload_notebook

    notebook = emr_notebook(opts.bucket) if opts.notebook else None  # a missing one: exit 2
    code = upload_bundle(s3, opts.bucket, build_bundle())
    if notebook is not None:
        upload_notebook(s3, opts.bucket, notebook)
    return code


def _same_region(bucket_region: str, opts: spec.ClusterOptions) -> None:
    if bucket_region != opts.region:
        logger.warning(
            f"emr: note: bucket {opts.bucket} is in {bucket_region}, the cluster in {opts.region}: "
            "both in the EU, but cross-region transfer is billed and slower"
        )


def _cmd_up(args) -> int:
    from cluster import emr

    opts = _options(args)
    s3 = emr.client("s3", opts.region)
    _same_region(guard.check_bucket(s3, opts.bucket), opts)  # before anything is created
    code = _upload_code(args, opts, s3)
    emr_client = emr.client("emr", opts.region)
    cluster_id = emr.create_cluster(emr_client, spec.build_request(opts, code))
    if args.wait:
        emr.wait_running(emr_client, cluster_id)
    print(cluster_id)
    return 0


def _cmd_submit(args) -> int:
    from cluster import emr

    region = _region(args)
    stage = args.stage
    stage_args = _stage_argv(args, stage)  # checked as the stage checks them
    s3 = emr.client("s3", region)
    extra = [args.results] if getattr(args, "results", None) else []
    guard.check_buckets(s3, [args.input, args.output, *extra])
    keeps = _keeps_output(args, stage)
    emr.check_s3_paths(
        s3, [args.input], [] if keeps else [args.output], getattr(args, "overwrite", False)
    )
    emr_client = emr.client("emr", region)
    code = emr.cluster_code_uri(emr.cluster_info(emr_client, args.cluster))
    guard.check_buckets(s3, [code])
    step = spec.stage_step(stage, args.input, args.output, code, stage_args, "CONTINUE")
    step_id = emr.add_step(emr_client, args.cluster, step)
    if args.no_wait:
        status = emr.step_status(emr_client, args.cluster, step_id)
    else:
        status = emr.wait_step(emr_client, args.cluster, step_id)
    _print_json(status)
    if args.no_wait:
        return 0
    return 0 if status["state"] == "COMPLETED" else 1


def _run_bucket(args) -> str:
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


def _cmd_run(args) -> int:
    from cluster import emr
    from stages.storage.outputs import default_features_path

    featurize_argv = _stage_argv(args, "featurize")  # checked as the stages check them
    reduce_argv = _stage_argv(args, "reduce")
    bucket = _run_bucket(args)
    opts = _options(args, bucket=bucket)
    features = args.features or default_features_path(args.results)
    s3 = emr.client("s3", opts.region)
    # GDPR first: every bucket read or written, before anything is uploaded or created.
    regions = guard.check_buckets(s3, [args.input, features, args.results], extra=[bucket])
    _same_region(regions[bucket], opts)
    outputs = [] if getattr(args, "incremental", False) else [features]
    outputs += [] if getattr(args, "update", False) else [args.results]
    emr.check_s3_paths(s3, [args.input], outputs, args.overwrite)
    code = _upload_code(args, opts, s3)
    steps = [
        spec.stage_step(
            "featurize", args.input, features, code, featurize_argv, "TERMINATE_CLUSTER"
        ),
        spec.stage_step("reduce", features, args.results, code, reduce_argv, "TERMINATE_CLUSTER"),
    ]
    emr_client = emr.client("emr", opts.region)
    request = spec.build_request(opts, code, steps=steps, keep_alive=False)
    cluster_id = emr.create_cluster(emr_client, request)
    step_ids = emr.list_step_ids(emr_client, cluster_id)
    if args.no_wait:
        logger.info(f"emr: {cluster_id} runs both steps and then terminates itself")
        _print_json({"cluster": cluster_id, "steps": step_ids})
        return 0
    results = []
    for step_id in step_ids:
        status = emr.wait_step(emr_client, cluster_id, step_id)
        results.append(status)
        if status["state"] != "COMPLETED":
            break
    if all(r["state"] in emr.STEP_DONE for r in results):
        state = emr.terminate(emr_client, cluster_id)
    else:  # gave up waiting: leave the step running; the cluster ends itself after it
        state = emr.cluster_info(emr_client, cluster_id)["Status"]["State"]
        logger.info(f"emr: stopped waiting; {cluster_id} terminates itself after its steps")
    ok = len(results) == len(step_ids) and all(r["state"] == "COMPLETED" for r in results)
    _print_json({"cluster": cluster_id, "state": state, "steps": results, "results": args.results})
    return 0 if ok else 1


def _cmd_status(args) -> int:
    from cluster import emr

    region = _region(args)
    _print_json(emr.describe(emr.client("emr", region), args.cluster), indent=2)
    return 0


def _cmd_down(args) -> int:
    from cluster import emr

    region = _region(args)
    state = emr.terminate(emr.client("emr", region), args.cluster)
    _print_json({"cluster": args.cluster, "state": state})
    return 0


def _cmd_policy(args) -> int:
    from cluster.policy import READ_PREFIXES, WRITE_PREFIXES, instance_profile_policy

    doc = instance_profile_policy(
        args.bucket, args.read or READ_PREFIXES, args.write or WRITE_PREFIXES
    )
    _print_json(doc, indent=2)
    return 0


# ------------------------------------------------------------------ parsers


def register(sub) -> None:
    """Add ``bucket`` and ``emr`` to the ``fruits-pipeline`` sub-parsers ``sub``."""
    b = sub.add_parser(
        "bucket", help="S3 bucket for the pipeline: EU, private, encrypted, TLS only"
    )
    _flags(b, top=True)
    bsub = b.add_subparsers(dest="bucket_command", metavar="ACTION")
    bsub.required = True
    p = bsub.add_parser(
        "create",
        help="create a bucket in an EU region with public access blocked, SSE-S3 and TLS only",
    )
    _flags(p)
    p.add_argument("bucket", metavar="BUCKET")
    p.set_defaults(func=_aws_errors(_cmd_bucket_create))
    from cluster import notifications  # `bucket notifications` lives in its own file

    notifications.register(bsub, _flags, _aws_errors)

    e = sub.add_parser("emr", help="run the pipeline on AWS EMR (EU regions only)")
    _flags(e, top=True)
    esub = e.add_subparsers(dest="emr_command", metavar="ACTION")
    esub.required = True

    p = esub.add_parser(
        "plan", help="run every check `up` runs, print the run_job_flow request; create nothing"
    )
    _flags(p)
    _add_cluster_options(p, bucket_required=True)
    p.set_defaults(func=_aws_errors(_cmd_plan))

    p = esub.add_parser("up", help="check GDPR, upload the code, start a cluster, print its id")
    _flags(p)
    _add_cluster_options(p, bucket_required=True)
    p.add_argument("--wait", action="store_true", help="wait until the cluster is ready")
    p.set_defaults(func=_aws_errors(_cmd_up))

    p = esub.add_parser("submit", help="run one stage as a step on a cluster and wait for it")
    _flags(p)
    p.add_argument("cluster", metavar="CLUSTER", help="cluster id (j-...)")
    ssub = p.add_subparsers(dest="stage", metavar="STAGE")
    ssub.required = True
    for stage, helptext, names in (
        (
            "featurize",
            "images -> features Parquet (--weights defaults to imagenet on EMR)",
            ("INPUT", "OUTPUT"),
        ),
        ("reduce", "features Parquet -> PCA results", ("FEATURES", "RESULTS")),
        (
            "watch",
            "Structured Streaming over INPUT into FEATURES (needs --available-now or --stop-after)",
            ("INPUT", "FEATURES"),
        ),
    ):
        sp = ssub.add_parser(stage, help=helptext)
        _flags(sp)
        sp.add_argument("input", metavar=names[0], help="s3:// URI")
        sp.add_argument("output", metavar=names[1], help="s3:// URI")
        _add_stage_options(sp, stage)
        sp.add_argument("--no-wait", action="store_true", help="print the step and return")
        sp.set_defaults(func=_aws_errors(_cmd_submit))

    p = esub.add_parser(
        "run", help="start a cluster, run featurize then reduce, terminate (one command)"
    )
    _flags(p)
    p.add_argument("input", metavar="INPUT", help="s3://B/Test/")
    p.add_argument("results", metavar="RESULTS", help="s3://B/Results/")
    p.add_argument("--features", default=None, help="default: Features beside RESULTS")
    _add_cluster_options(p, bucket_required=False, engine_option=False)
    _add_stage_options(p, "featurize", exclude=("overwrite",))
    _add_stage_options(p, "reduce", exclude=("overwrite",))
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--no-wait", action="store_true", help="print the cluster id; it terminates after the steps"
    )
    p.set_defaults(func=_aws_errors(_cmd_run))

    p = esub.add_parser("status", help="state, nodes and steps of a cluster")
    _flags(p)
    p.add_argument("cluster", metavar="CLUSTER")
    p.set_defaults(func=_aws_errors(_cmd_status))

    p = esub.add_parser("down", help="terminate a cluster")
    _flags(p)
    p.add_argument("cluster", metavar="CLUSTER")
    p.set_defaults(func=_aws_errors(_cmd_down))

    p = esub.add_parser("policy", help="print the least-privilege S3 policy of the nodes' role")
    _flags(p)
    p.add_argument("--bucket", required=True)
    p.add_argument(
        "--read",
        action="append",
        default=None,
        metavar="PREFIX",
        help="read-only prefix (repeatable; default Test/ code/)",
    )
    p.add_argument(
        "--write",
        action="append",
        default=None,
        metavar="PREFIX",
        help="read-write prefix (repeatable; default Features/ Results/ logs/ jupyter/)",
    )
    p.set_defaults(func=_cmd_policy)
