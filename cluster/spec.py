"""The EMR ``run_job_flow`` request and the steps, as plain dicts (pure: no AWS calls).

``fruits-pipeline emr plan`` prints :func:`build_request`'s result; ``emr up`` sends it.
The executor sizing and the prices come from :mod:`cluster.sizing`.

Layout in the bucket ``B`` (the IAM policy of :mod:`cluster.policy` follows it)::

    s3://B/code/<version>/   fruits_pipeline-<wheel version>-py3-none-any.whl,
                             featurize.py, reduce.py, bootstrap-emr.sh, requirements-emr.txt
    s3://B/logs/emr/         EMR's LogUri (step and container logs)
    s3://B/jupyter/jovyan/   notebooks, with --notebook (JupyterHub S3 persistence;
                             jovyan is JupyterHub's default user)
    s3://B/Test/ Features/ Results/   the data (by convention; any prefix works)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cluster.budget import RUN_TAG, check_alerts
from cluster.classifications import PYTHON, configurations
from cluster.guard import DEFAULT_REGION, check_region, parse_s3_uri, validate_bucket_name
from cluster.network import check_cidr
from cluster.sizing import ROOT_VOLUME_GIB, executor_layout
from stages.base.errors import UsageError

__all__ = [
    "BOOTSTRAP_NAME",
    "DIST_NAME",
    "JUPYTER_USER",
    "NODE_WEIGHTS_DIR",
    "NOTEBOOK_NAME",
    "PYTHON",
    "RELEASE_LABEL",
    "REQUIREMENTS_NAME",
    "STAGE_SCRIPTS",
    "ClusterOptions",
    "build_request",
    "code_uri",
    "code_version",
    "log_uri",
    "notebook_key",
    "stage_step",
    "step_log_uri",
    "validate_options",
    "wheel_name",
]

RELEASE_LABEL = "emr-7.6.0"  # Spark 3.5.3, Amazon Linux 2023

CODE_PREFIX = "code/"
LOG_PREFIX = "logs/emr/"
JUPYTER_PREFIX = "jupyter/"
# JupyterHub on EMR keeps each user's notebooks in s3://B/jupyter/<user>/; jovyan is the
# default (and only, until you add users) one.
JUPYTER_USER = "jovyan"
NOTEBOOK_NAME = "fruits_pipeline.ipynb"
DIST_NAME = "fruits-pipeline"
BOOTSTRAP_NAME = "bootstrap-emr.sh"
REQUIREMENTS_NAME = "requirements-emr.txt"
STAGE_SCRIPTS: Dict[str, str] = {
    "featurize": "featurize.py",
    "reduce": "reduce.py",
    "watch": "watch.py",
}
# Where the bootstrap copies the bundled weights, for steps given --weights bundled (the
# installed package has them too, as stages/weights/*.h5 in site-packages).
NODE_WEIGHTS_DIR = "/opt/fruits-pipeline/weights"

TAGS: Dict[str, str] = {"project": "fruits-pipeline", "data-residency": "eu"}
CODE_TAG = "code-uri"  # lets `emr submit` find the code a cluster was bootstrapped with


@dataclass(frozen=True)
class ClusterOptions:
    """What ``fruits-pipeline emr plan|up|run`` asks for."""

    bucket: str
    region: str = DEFAULT_REGION
    instance_type: str = "m5.large"
    engine: str = "litert"
    core: int = 2
    task: int = 0
    spot: bool = False
    idle_timeout: int = 3600
    max_instances: Optional[int] = None
    notebook: bool = False
    name: str = "fruits-pipeline"
    service_role: str = "EMR_DefaultRole"
    job_flow_role: str = "EMR_EC2_DefaultRole"
    subnet_id: Optional[str] = None
    key_name: Optional[str] = None
    security_configuration: Optional[str] = None
    # cost and access (cluster.costs, cluster.deadline, cluster.budget, cluster.network)
    run_id: Optional[str] = None  # the value of the cost-allocation tag fruits-pipeline:run
    max_cost: Optional[float] = None
    budget: Optional[float] = None
    alert_emails: Tuple[str, ...] = ()
    alert_sns: Optional[str] = None
    ssh_from: Optional[str] = None
    ssh_from_anywhere: bool = False


def validate_options(opts: ClusterOptions) -> ClusterOptions:
    """Return ``opts`` if consistent; raise :class:`UsageError` with the fix otherwise."""
    check_region(opts.region)
    validate_bucket_name(opts.bucket)
    executor_layout(opts.instance_type, opts.engine)
    if opts.core < 1:
        raise UsageError(f"--core {opts.core} must be at least 1 (core nodes run the driver)")
    if opts.task < 0:
        raise UsageError(f"--task {opts.task} must be 0 or more")
    if opts.spot and opts.task == 0:
        raise UsageError("--spot applies to task nodes only: add --task N (N >= 1)")
    if not 60 <= opts.idle_timeout <= 604800:
        raise UsageError(
            f"--idle-timeout {opts.idle_timeout} must be between 60 and 604800 seconds (7 days)"
        )
    if opts.max_instances is not None and opts.max_instances < opts.core + opts.task:
        raise UsageError(
            f"--max-instances {opts.max_instances} is below the {opts.core + opts.task} "
            "core and task nodes asked for: raise it or drop it"
        )
    if opts.max_cost is not None and not opts.max_cost > 0:
        raise UsageError(f"--max-cost {opts.max_cost:g} must be above 0 USD")
    check_alerts(opts.budget, opts.alert_emails, opts.alert_sns)
    if opts.ssh_from_anywhere and not opts.ssh_from:
        raise UsageError("--ssh-from-anywhere goes with --ssh-from 0.0.0.0/0 (or ::/0)")
    if opts.ssh_from:
        check_cidr(opts.ssh_from, opts.ssh_from_anywhere)
        if not opts.key_name:
            raise UsageError(
                "--ssh-from opens port 22, but without --key-name no one can log in: "
                "add --key-name KEYPAIR"
            )
    return opts


def code_uri(bucket: str, version: str) -> str:
    """``s3://B/code/<version>/``, where ``emr up`` uploads the code."""
    return f"s3://{bucket}/{CODE_PREFIX}{version}/"


def code_version(code: str) -> str:
    """The ``<version>`` of ``s3://B/code/<version>/``."""
    return code.rstrip("/").rsplit("/", 1)[-1]


def wheel_name(version: str) -> str:
    """The wheel of code version ``0.1.0-<sha>``: ``fruits_pipeline-0.1.0+<sha>-py3-none-any.whl``.

    The content hash becomes a PEP 440 local version label, so ``pip show
    fruits-pipeline`` on a node names the code folder it came from.
    """
    base, _, local = version.partition("-")
    full = f"{base}+{local.replace('-', '.')}" if local else base
    return f"{DIST_NAME.replace('-', '_')}-{full}-py3-none-any.whl"


def notebook_key(name: str = NOTEBOOK_NAME) -> str:
    """``jupyter/jovyan/<name>``: where JupyterHub's default user finds a notebook."""
    return f"{JUPYTER_PREFIX}{JUPYTER_USER}/{name}"


def log_uri(bucket: str) -> str:
    """``s3://B/logs/emr/``, the cluster's LogUri."""
    return f"s3://{bucket}/{LOG_PREFIX}"


def step_log_uri(cluster_log_uri: str, cluster_id: str, step_id: str) -> str:
    """Where EMR puts a step's ``stdout.gz``/``stderr.gz`` (a few minutes after it ends)."""
    base = cluster_log_uri if cluster_log_uri.endswith("/") else cluster_log_uri + "/"
    return f"{base}{cluster_id}/steps/{step_id}/"


def build_request(
    opts: ClusterOptions,
    code: str,
    steps: Sequence[Dict[str, Any]] = (),
    keep_alive: bool = True,
) -> Dict[str, Any]:
    """The ``run_job_flow`` keyword arguments.

    Parameters
    ----------
    opts : ClusterOptions
        Validated here.
    code : str
        ``s3://B/code/<version>/`` (:func:`code_uri`): the bootstrap script's folder,
        and the wheel it installs (:func:`wheel_name`).
    steps : sequence of dict
        Steps to run at start (:func:`stage_step`); ``emr run`` passes both stages.
    keep_alive : bool
        ``False`` makes the cluster terminate itself after its last step.

    Returns
    -------
    dict
    """
    validate_options(opts)
    groups: List[Dict[str, Any]] = [
        _group("Primary", "MASTER", opts.instance_type, 1),
        _group("Core", "CORE", opts.instance_type, opts.core),
    ]
    if opts.task:
        groups.append(
            _group(
                "Task", "TASK", opts.instance_type, opts.task, "SPOT" if opts.spot else "ON_DEMAND"
            )
        )
    instances: Dict[str, Any] = {
        "InstanceGroups": groups,
        "KeepJobFlowAliveWhenNoSteps": keep_alive,
        "TerminationProtected": False,
    }
    if opts.subnet_id:
        instances["Ec2SubnetId"] = opts.subnet_id
    if opts.key_name:
        instances["Ec2KeyName"] = opts.key_name
    apps = ["Spark"] + (["JupyterHub", "Livy"] if opts.notebook else [])
    # EMR copies the cluster's tags to its EC2 instances: the run tag reaches the bill.
    tags = {**TAGS, CODE_TAG: code, **({RUN_TAG: opts.run_id} if opts.run_id else {})}
    request: Dict[str, Any] = {
        "Name": opts.name,
        "ReleaseLabel": RELEASE_LABEL,
        "LogUri": log_uri(opts.bucket),
        "Applications": [{"Name": a} for a in apps],
        "Instances": instances,
        "BootstrapActions": [
            {
                "Name": "fruits-pipeline and its libraries (python3.11)",
                "ScriptBootstrapAction": {
                    "Path": code + BOOTSTRAP_NAME,
                    "Args": [code + wheel_name(code_version(code))],
                },
            }
        ],
        "Configurations": configurations(
            opts.instance_type, opts.engine, opts.bucket if opts.notebook else None
        ),
        "JobFlowRole": opts.job_flow_role,
        "ServiceRole": opts.service_role,
        "VisibleToAllUsers": True,
        "AutoTerminationPolicy": {"IdleTimeout": opts.idle_timeout},
        "ScaleDownBehavior": "TERMINATE_AT_TASK_COMPLETION",
        "EbsRootVolumeSize": ROOT_VOLUME_GIB,
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }
    if steps:
        request["Steps"] = list(steps)
    if opts.max_instances is not None:
        limits: Dict[str, Any] = {
            "UnitType": "Instances",
            # core and task nodes; the primary is not counted
            "MinimumCapacityUnits": opts.core,
            "MaximumCapacityUnits": opts.max_instances,
        }
        if opts.task:
            # grow task nodes only: core nodes hold HDFS and the driver's container
            limits["MaximumCoreCapacityUnits"] = opts.core
        if opts.spot:
            limits["MaximumOnDemandCapacityUnits"] = opts.core
        request["ManagedScalingPolicy"] = {"ComputeLimits": limits}
    if opts.security_configuration:
        request["SecurityConfiguration"] = opts.security_configuration
    return request


def stage_step(
    stage: str,
    input_uri: str,
    output_uri: str,
    code: str,
    stage_args: Sequence[str] = (),
    action_on_failure: str = "CONTINUE",
    name: Optional[str] = None,
) -> Dict[str, Any]:
    """One EMR step: ``spark-submit --deploy-mode cluster`` of a stage script.

    No ``--py-files``: the step imports the project the bootstrap installed on every node
    (the same version: ``emr submit`` uses the code of the cluster's ``code-uri`` tag),
    as Livy sessions do.  One copy of the code per node; its package data (weights,
    log4j2 config) are real files, which libraries that open paths (h5py, log4j) need.

    Parameters
    ----------
    stage : {"featurize", "reduce", "watch"}
    input_uri, output_uri : str
        S3 URIs (``s3://``, ``s3a://``, ``s3n://``), passed through unchanged.
    code : str
        ``s3://B/code/<version>/`` holding the stage scripts.
    stage_args : sequence of str
        The stage's own options (``--k 50``, ``--weights imagenet``, ...).
    action_on_failure : str
        ``CONTINUE`` (``emr submit``) or ``TERMINATE_CLUSTER`` (``emr run``).
    """
    if stage not in STAGE_SCRIPTS:
        raise UsageError(f"unknown stage {stage!r}: use one of {', '.join(STAGE_SCRIPTS)}")
    parse_s3_uri(input_uri)
    parse_s3_uri(output_uri)
    args = [
        "spark-submit",
        "--deploy-mode",
        "cluster",
        code + STAGE_SCRIPTS[stage],
        input_uri,
        output_uri,
        *stage_args,
    ]
    return {
        "Name": name or f"fruits-pipeline {stage}",
        "ActionOnFailure": action_on_failure,
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": args},
    }


def _group(name: str, role: str, instance_type: str, count: int, market: str = "ON_DEMAND"):
    return {
        "Name": name,
        "InstanceRole": role,
        "Market": market,
        "InstanceType": instance_type,
        "InstanceCount": count,
    }
