"""The EMR ``run_job_flow`` request and the steps, as plain dicts (pure: no AWS calls).

``fruits-pipeline emr plan`` prints :func:`build_request`'s result; ``emr up`` sends it.

Layout in the bucket ``B`` (the IAM policy of :mod:`cluster.policy` follows it)::

    s3://B/code/<version>/   fruits_pipeline.zip, featurize.py, reduce.py,
                             bootstrap-emr.sh, requirements-emr.txt
    s3://B/logs/emr/         EMR's LogUri (step and container logs)
    s3://B/jupyter/          notebooks, with --notebook (JupyterHub S3 persistence)
    s3://B/Test/ Features/ Results/   the data (by convention; any prefix works)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from cluster.guard import DEFAULT_REGION, check_region, parse_s3_uri, validate_bucket_name
from stages.errors import UsageError

__all__ = [
    "BOOTSTRAP_NAME",
    "INSTANCE_TYPES",
    "NODE_WEIGHTS_DIR",
    "PYTHON",
    "RELEASE_LABEL",
    "REQUIREMENTS_NAME",
    "STAGE_SCRIPTS",
    "ZIP_NAME",
    "ClusterOptions",
    "ExecutorLayout",
    "InstanceType",
    "build_request",
    "code_uri",
    "configurations",
    "executor_layout",
    "hourly_cost",
    "log_uri",
    "spark_defaults",
    "stage_step",
    "step_log_uri",
    "total_slots",
    "validate_options",
]

RELEASE_LABEL = "emr-7.6.0"  # Spark 3.5.3, Amazon Linux 2023
# EMR 7.6.0 runs PySpark on Python 3.9 by default; the bootstrap installs our libraries
# for 3.11, and the spark-env classification points Spark at it.
PYTHON = "/usr/bin/python3.11"

CODE_PREFIX = "code/"
LOG_PREFIX = "logs/emr/"
JUPYTER_PREFIX = "jupyter/"
ZIP_NAME = "fruits_pipeline.zip"
BOOTSTRAP_NAME = "bootstrap-emr.sh"
REQUIREMENTS_NAME = "requirements-emr.txt"
STAGE_SCRIPTS: Dict[str, str] = {
    "featurize": "featurize.py",
    "reduce": "reduce.py",
    "watch": "watch.py",
}
# Where the bootstrap unpacks the bundled weights: an .h5 inside the zip on
# --py-files cannot be opened by h5py.
NODE_WEIGHTS_DIR = "/opt/fruits-pipeline/weights"

TAGS: Dict[str, str] = {"project": "fruits-pipeline", "data-residency": "eu"}
CODE_TAG = "code-uri"  # lets `emr submit` find the code a cluster was bootstrapped with


@dataclass(frozen=True)
class InstanceType:
    """One EC2 instance type as EMR sees it.

    ``yarn_mib`` is EMR's default ``yarn.nodemanager.resource.memory-mb`` for the type
    (EMR Release Guide, "Task configuration"): what YARN may hand to containers.
    Prices are USD per hour, on-demand, Linux, eu-west-3: ``ec2_usd`` the instance,
    ``emr_usd`` EMR's uplift on top of it.
    """

    name: str
    vcpu: int
    memory_gib: int
    yarn_mib: int
    ec2_usd: float
    emr_usd: float


# Prices: ASSUMPTIONS, as recalled from the AWS pricing pages (EC2 On-Demand and Amazon
# EMR, region "Europe (Paris)"), 2024 list prices; not re-checked here (no network).
# Check https://aws.amazon.com/ec2/pricing/on-demand/ and https://aws.amazon.com/emr/pricing/
# before quoting a cost.  EC2 and the EMR uplift are billed separately, per second.
INSTANCE_TYPES: Dict[str, InstanceType] = {
    it.name: it
    for it in (
        InstanceType("m5.large", 2, 8, 6144, 0.112, 0.024),
        InstanceType("m5.xlarge", 4, 16, 12288, 0.224, 0.048),
        InstanceType("m5.2xlarge", 8, 32, 24576, 0.448, 0.096),
        InstanceType("c5.xlarge", 4, 8, 6144, 0.202, 0.043),
        InstanceType("r5.xlarge", 4, 32, 24576, 0.296, 0.063),
    )
}

# A Python worker holds ~0.6 GB after building MobileNetV2 and peaks near 1.9 GB RSS with
# alpha 1.0 and batches of 64 (measured); 2 GiB each leaves a little margin.
PYTHON_WORKER_MIB = 2048
# Spark's floor for memoryOverhead: JVM off-heap, netty, Arrow buffers of mapInArrow.
JVM_OVERHEAD_MIB = 384
# Executor heap floor: Spark refuses < 450 MiB; 640 MiB leaves ~200 MiB of unified
# memory for the binaryFile rows in flight and the Parquet writer of ~5 KB feature rows.
MIN_HEAP_MIB = 640


@dataclass(frozen=True)
class ExecutorLayout:
    """How Spark's executors fill one node of an instance type.

    One task, hence one Python worker (and one model), per executor: ``cores`` equals
    ``task_cpus``, the threads TensorFlow gets (``stages.featurize`` reads
    ``TaskContext.cpus()``).  The driver, which runs in a YARN container on a core node
    in cluster deploy mode, is sized like one executor so it displaces exactly one.
    """

    instance_type: str
    executors_per_node: int
    cores: int
    task_cpus: int
    container_mib: int
    heap_mib: int
    overhead_mib: int
    python_mib: int


def executor_layout(instance_type: str) -> ExecutorLayout:
    """Size executors so YARN never kills a container for its Python worker's memory.

    Python memory is counted in ``spark.executor.memoryOverhead`` rather than
    ``spark.executor.pyspark.memory``: the latter sets ``RLIMIT_AS`` on each worker, a
    cap on *virtual* memory, and TensorFlow maps about twice its resident size (3.0 GB
    virtual for 1.6 GB resident after one alpha-1.0 batch, measured), so the cap would
    kill a worker that YARN would have let live.

    Raises
    ------
    UsageError
        Unknown instance type, or one too small for a single Python worker.
    """
    it = _instance(instance_type)
    slot_min = MIN_HEAP_MIB + JVM_OVERHEAD_MIB + PYTHON_WORKER_MIB
    workers = min(it.vcpu, it.yarn_mib // slot_min)
    if workers < 1:  # pragma: no cover - every type in the table fits one
        raise UsageError(f"{instance_type} has too little YARN memory for one Python worker")
    task_cpus = it.vcpu // workers  # memory-bound types (c5) give each worker more threads
    container = (it.yarn_mib // workers) // 128 * 128
    overhead = JVM_OVERHEAD_MIB + PYTHON_WORKER_MIB
    return ExecutorLayout(
        instance_type=it.name,
        executors_per_node=workers,
        cores=task_cpus,
        task_cpus=task_cpus,
        container_mib=container,
        heap_mib=container - overhead,
        overhead_mib=overhead,
        python_mib=PYTHON_WORKER_MIB,
    )


def spark_defaults(instance_type: str) -> Dict[str, str]:
    """The ``spark-defaults`` classification for core/task nodes of ``instance_type``."""
    lay = executor_layout(instance_type)
    return {
        "spark.executor.cores": str(lay.cores),
        "spark.task.cpus": str(lay.task_cpus),
        "spark.executor.memory": f"{lay.heap_mib}m",
        "spark.executor.memoryOverhead": f"{lay.overhead_mib}m",
        "spark.driver.cores": "1",
        "spark.driver.memory": f"{lay.heap_mib}m",
        # the Python driver imports TensorFlow and builds the model to read the weights
        "spark.driver.memoryOverhead": f"{lay.overhead_mib}m",
        "spark.pyspark.python": PYTHON,
        "spark.pyspark.driver.python": PYTHON,
        # one model build per worker, not per task (8x slower without, measured)
        "spark.python.worker.reuse": "true",
        # binaryFile packs ~30 small JPEGs per 4 MB split by default: far too few tasks
        "spark.sql.files.openCostInBytes": "65536",
        # managed scaling needs it; a longer idle timeout keeps executors (and their
        # models) between the jobs of one step
        "spark.dynamicAllocation.enabled": "true",
        "spark.dynamicAllocation.executorIdleTimeout": "300s",
        # a second driver attempt would redo an hour of featurizing, then fail on the
        # existing output: fail once, clearly
        "spark.yarn.maxAppAttempts": "1",
    }


@dataclass(frozen=True)
class ClusterOptions:
    """What ``fruits-pipeline emr plan|up|run`` asks for."""

    bucket: str
    region: str = DEFAULT_REGION
    instance_type: str = "m5.large"
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


def validate_options(opts: ClusterOptions) -> ClusterOptions:
    """Return ``opts`` if consistent; raise :class:`UsageError` with the fix otherwise."""
    check_region(opts.region)
    validate_bucket_name(opts.bucket)
    _instance(opts.instance_type)
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
    return opts


def code_uri(bucket: str, version: str) -> str:
    """``s3://B/code/<version>/``, where ``emr up`` uploads the code."""
    return f"s3://{bucket}/{CODE_PREFIX}{version}/"


def log_uri(bucket: str) -> str:
    """``s3://B/logs/emr/``, the cluster's LogUri."""
    return f"s3://{bucket}/{LOG_PREFIX}"


def step_log_uri(cluster_log_uri: str, cluster_id: str, step_id: str) -> str:
    """Where EMR puts a step's ``stdout.gz``/``stderr.gz`` (a few minutes after it ends)."""
    base = cluster_log_uri if cluster_log_uri.endswith("/") else cluster_log_uri + "/"
    return f"{base}{cluster_id}/steps/{step_id}/"


def configurations(opts: ClusterOptions) -> List[Dict[str, Any]]:
    """The ``Configurations`` of the request: Python 3.11, Spark sizing, notebooks."""
    confs: List[Dict[str, Any]] = [
        {
            "Classification": "spark-env",
            "Properties": {},
            "Configurations": [
                {
                    "Classification": "export",
                    "Properties": {"PYSPARK_PYTHON": PYTHON, "PYSPARK_DRIVER_PYTHON": PYTHON},
                }
            ],
        },
        {"Classification": "spark-defaults", "Properties": spark_defaults(opts.instance_type)},
    ]
    if opts.notebook:
        # JupyterHub saves notebooks to s3://B/jupyter/ instead of the primary's disk.
        confs.append(
            {
                "Classification": "jupyter-s3-conf",
                "Properties": {
                    "s3.persistence.enabled": "true",
                    "s3.persistence.bucket": opts.bucket,
                },
            }
        )
    return confs


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
        ``s3://B/code/<version>/`` (:func:`code_uri`): the bootstrap script's folder.
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
    request: Dict[str, Any] = {
        "Name": opts.name,
        "ReleaseLabel": RELEASE_LABEL,
        "LogUri": log_uri(opts.bucket),
        "Applications": [{"Name": a} for a in apps],
        "Instances": instances,
        "BootstrapActions": [
            {
                "Name": "fruits-pipeline libraries (python3.11)",
                "ScriptBootstrapAction": {"Path": code + BOOTSTRAP_NAME, "Args": [code]},
            }
        ],
        "Configurations": configurations(opts),
        "JobFlowRole": opts.job_flow_role,
        "ServiceRole": opts.service_role,
        "VisibleToAllUsers": True,
        "AutoTerminationPolicy": {"IdleTimeout": opts.idle_timeout},
        "ScaleDownBehavior": "TERMINATE_AT_TASK_COMPLETION",
        # pip's TensorFlow adds ~1.5 GB to the root volume (15 GiB by default)
        "EbsRootVolumeSize": 32,
        "Tags": [{"Key": k, "Value": v} for k, v in {**TAGS, CODE_TAG: code}.items()],
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

    Parameters
    ----------
    stage : {"featurize", "reduce", "watch"}
    input_uri, output_uri : str
        S3 URIs (``s3://``, ``s3a://``, ``s3n://``), passed through unchanged.
    code : str
        ``s3://B/code/<version>/`` holding the zip and the stage scripts.
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
        "--py-files",
        code + ZIP_NAME,
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


def hourly_cost(opts: ClusterOptions) -> Dict[str, float]:
    """USD per hour of the cluster at start (on-demand prices; Spot counted at on-demand).

    Returns
    -------
    dict
        ``nodes``, ``ec2_usd``, ``emr_usd``, ``total_usd`` (per hour).
    """
    it = _instance(opts.instance_type)
    nodes = 1 + opts.core + opts.task
    ec2 = nodes * it.ec2_usd
    emr = nodes * it.emr_usd
    return {
        "nodes": nodes,
        "ec2_usd": round(ec2, 4),
        "emr_usd": round(emr, 4),
        "total_usd": round(ec2 + emr, 4),
    }


def _instance(name: str) -> InstanceType:
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        raise UsageError(
            f"--instance-type {name!r} is not in the sizing table: use one of "
            f"{', '.join(INSTANCE_TYPES)}"
        ) from None


def _group(name: str, role: str, instance_type: str, count: int, market: str = "ON_DEMAND"):
    return {
        "Name": name,
        "InstanceRole": role,
        "Market": market,
        "InstanceType": instance_type,
        "InstanceCount": count,
    }


def total_slots(opts: ClusterOptions) -> int:
    """Concurrent featurize tasks on the cluster at start, after the driver's container."""
    lay = executor_layout(opts.instance_type)
    return max(0, (opts.core + opts.task) * lay.executors_per_node - 1)
