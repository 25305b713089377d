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

import functools
import json
import logging
from typing import Any, Callable, Optional

from cluster import costs, guard, spec
from cluster.options import (
    add_cluster_options,
    add_stage_options,
    cluster_options,
    flags,
    keeps_output,
    run_bucket,
    stage_argv,
    stage_params,
)
from cluster.options import region as _region
from stages.base.errors import UsageError

__all__ = ["register"]

logger = logging.getLogger(__name__)


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
    from cluster.launch import check_architecture, cost_limit, estimate_run, show_estimate
    from cluster.package import build_bundle, emr_notebook

    opts = cluster_options(args)
    # The same checks as `up`, in the same order: a plan that `up` would refuse is refused.
    s3 = emr.client("s3", opts.region)
    _same_region(guard.check_bucket(s3, opts.bucket), opts)
    if args.input:
        guard.check_buckets(s3, [args.input])
    if opts.notebook:
        emr_notebook(opts.bucket)  # `up` refuses a missing notebook before uploading: so do we
    est = estimate_run(opts, s3, args.images, args.input, opts.engine, args.alpha)
    deadline_s = cost_limit(opts, est)
    check_architecture(opts)
    bundle = build_bundle()
    request = spec.build_request(opts, bundle.uri(opts.bucket))
    cost = costs.hourly_cost(opts)
    logger.info(
        f"emr plan: {cost['nodes']} x {opts.instance_type} in {opts.region}, "
        f"~{cost['total_usd']:.3f} USD/h on-demand (EC2 {cost['ec2_usd']:.3f} + EMR "
        f"{cost['emr_usd']:.3f} + EBS {cost['ebs_usd']:.3f}; prices are assumptions, see "
        "cluster/sizing.py); nothing created"
    )
    show_estimate(opts, est, deadline_s)
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
    from cluster.launch import check_architecture, cost_limit, estimate_run, show_estimate, start

    opts = cluster_options(args)
    s3 = emr.client("s3", opts.region)
    _same_region(guard.check_bucket(s3, opts.bucket), opts)  # before anything is created
    est = estimate_run(opts, s3, args.images, None, opts.engine, 1.0)
    deadline_s = cost_limit(opts, est)  # refused here: nothing uploaded or created
    check_architecture(opts)
    show_estimate(opts, est, deadline_s)
    code = _upload_code(args, opts, s3)
    cluster_id = start(opts, spec.build_request(opts, code), deadline_s)
    if args.wait:
        emr.wait_running(emr.client("emr", opts.region), cluster_id)
    print(cluster_id)
    return 0


def _cmd_submit(args) -> int:
    from cluster import emr

    region = _region(args)
    stage = args.stage
    stage_args = stage_argv(args, stage)  # checked as the stage checks them
    s3 = emr.client("s3", region)
    extra = [args.results] if getattr(args, "results", None) else []
    guard.check_buckets(s3, [args.input, args.output, *extra])
    keeps = keeps_output(args, stage)
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


def _cmd_run(args) -> int:
    from cluster import emr
    from cluster.launch import (
        check_architecture,
        cost_limit,
        estimate_run,
        show_estimate,
        start,
        teardown,
    )
    from stages.storage.outputs import default_features_path

    featurize = stage_params(args, "featurize")  # checked as the stages check them
    featurize_argv = featurize.to_argv()
    reduce_argv = stage_argv(args, "reduce")
    bucket = run_bucket(args)
    opts = cluster_options(args, bucket=bucket)
    features = args.features or default_features_path(args.results)
    s3 = emr.client("s3", opts.region)
    # GDPR first: every bucket read or written, before anything is uploaded or created.
    regions = guard.check_buckets(s3, [args.input, features, args.results], extra=[bucket])
    _same_region(regions[bucket], opts)
    outputs = [] if getattr(args, "incremental", False) else [features]
    outputs += [] if getattr(args, "update", False) else [args.results]
    emr.check_s3_paths(s3, [args.input], outputs, args.overwrite)
    # EMR's default weights are Keras' ImageNet ones, alpha 1.0 (bundled: 0.35, set above)
    alpha = featurize.alpha or 1.0
    est = estimate_run(opts, s3, args.images, args.input, featurize.engine or "litert", alpha)
    deadline_s = cost_limit(opts, est)  # refused here: nothing uploaded or created
    check_architecture(opts)
    show_estimate(opts, est, deadline_s)
    code = _upload_code(args, opts, s3)
    steps = [
        spec.stage_step(
            "featurize", args.input, features, code, featurize_argv, "TERMINATE_CLUSTER"
        ),
        spec.stage_step("reduce", features, args.results, code, reduce_argv, "TERMINATE_CLUSTER"),
    ]
    request = spec.build_request(opts, code, steps=steps, keep_alive=False)
    cluster_id = start(opts, request, deadline_s)
    emr_client = emr.client("emr", opts.region)
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
        state = teardown(opts.region, cluster_id)["state"]
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
    from cluster.launch import teardown

    _print_json(teardown(_region(args), args.cluster))
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
    flags(b, top=True)
    bsub = b.add_subparsers(dest="bucket_command", metavar="ACTION")
    bsub.required = True
    p = bsub.add_parser(
        "create",
        help="create a bucket in an EU region with public access blocked, SSE-S3 and TLS only",
    )
    flags(p)
    p.add_argument("bucket", metavar="BUCKET")
    p.set_defaults(func=_aws_errors(_cmd_bucket_create))
    from cluster import notifications  # `bucket notifications` lives in its own file

    notifications.register(bsub, flags, _aws_errors)

    e = sub.add_parser("emr", help="run the pipeline on AWS EMR (EU regions only)")
    flags(e, top=True)
    esub = e.add_subparsers(dest="emr_command", metavar="ACTION")
    esub.required = True

    p = esub.add_parser(
        "plan",
        help="run every check `up` runs, print the estimate and the run_job_flow request; "
        "create nothing",
    )
    flags(p)
    add_cluster_options(p, bucket_required=True)
    p.add_argument(
        "--input",
        default=None,
        metavar="URI",
        help="s3://B/Test/: count its images for the estimate",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="MobileNetV2 width for the estimate (default 1.0, EMR's imagenet weights)",
    )
    p.set_defaults(func=_aws_errors(_cmd_plan))

    p = esub.add_parser("up", help="check GDPR, upload the code, start a cluster, print its id")
    flags(p)
    add_cluster_options(p, bucket_required=True)
    p.add_argument("--wait", action="store_true", help="wait until the cluster is ready")
    p.set_defaults(func=_aws_errors(_cmd_up))

    p = esub.add_parser("submit", help="run one stage as a step on a cluster and wait for it")
    flags(p)
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
        flags(sp)
        sp.add_argument("input", metavar=names[0], help="s3:// URI")
        sp.add_argument("output", metavar=names[1], help="s3:// URI")
        add_stage_options(sp, stage)
        sp.add_argument("--no-wait", action="store_true", help="print the step and return")
        sp.set_defaults(func=_aws_errors(_cmd_submit))

    p = esub.add_parser(
        "run", help="start a cluster, run featurize then reduce, terminate (one command)"
    )
    flags(p)
    p.add_argument("input", metavar="INPUT", help="s3://B/Test/")
    p.add_argument("results", metavar="RESULTS", help="s3://B/Results/")
    p.add_argument("--features", default=None, help="default: Features beside RESULTS")
    add_cluster_options(p, bucket_required=False, engine_option=False)
    add_stage_options(p, "featurize", exclude=("overwrite",))
    add_stage_options(p, "reduce", exclude=("overwrite",))
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--no-wait", action="store_true", help="print the cluster id; it terminates after the steps"
    )
    p.set_defaults(func=_aws_errors(_cmd_run))

    p = esub.add_parser("status", help="state, nodes and steps of a cluster")
    flags(p)
    p.add_argument("cluster", metavar="CLUSTER")
    p.set_defaults(func=_aws_errors(_cmd_status))

    p = esub.add_parser(
        "down", help="terminate a cluster; remove its deadline schedule and SSH rule"
    )
    flags(p)
    p.add_argument("cluster", metavar="CLUSTER")
    p.set_defaults(func=_aws_errors(_cmd_down))

    p = esub.add_parser("policy", help="print the least-privilege S3 policy of the nodes' role")
    flags(p)
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
