"""cluster.spec: the run_job_flow request and the steps, field by field (no AWS)."""

from __future__ import annotations

import json

import pytest

from cluster import classifications, costs, sizing, spec
from cluster.spec import ClusterOptions, build_request, code_uri, stage_step
from stages.base.errors import UsageError

BUCKET = "fruits-eu"
CODE = code_uri(BUCKET, "0.1.0-abc")


def _mib(value: str) -> int:
    assert value.endswith("m"), value
    return int(value[:-1])


def _classification(request, name):
    found = [c for c in request["Configurations"] if c["Classification"] == name]
    assert len(found) == 1, [c["Classification"] for c in request["Configurations"]]
    return found[0]


def _groups(request):
    return {g["InstanceRole"]: g for g in request["Instances"]["InstanceGroups"]}


def test_default_request_fields():
    req = build_request(ClusterOptions(bucket=BUCKET), CODE)
    assert req["ReleaseLabel"] == "emr-7.6.0"
    assert req["LogUri"] == "s3://fruits-eu/logs/emr/"
    assert req["JobFlowRole"] == "EMR_EC2_DefaultRole"
    assert req["ServiceRole"] == "EMR_DefaultRole"
    assert req["VisibleToAllUsers"] is True
    assert req["AutoTerminationPolicy"] == {"IdleTimeout": 3600}
    assert req["Applications"] == [{"Name": "Spark"}]
    assert req["Instances"]["KeepJobFlowAliveWhenNoSteps"] is True
    assert "ManagedScalingPolicy" not in req
    assert "Steps" not in req
    tags = {t["Key"]: t["Value"] for t in req["Tags"]}
    assert tags["project"] == "fruits-pipeline"
    assert tags["data-residency"] == "eu"
    assert tags["code-uri"] == "s3://fruits-eu/code/0.1.0-abc/"


def test_instance_groups_primary_core_and_no_task_by_default():
    groups = _groups(build_request(ClusterOptions(bucket=BUCKET), CODE))
    assert set(groups) == {"MASTER", "CORE"}
    assert groups["MASTER"]["InstanceCount"] == 1
    assert groups["CORE"]["InstanceCount"] == 2
    assert {g["InstanceType"] for g in groups.values()} == {"m5.large"}
    assert {g["Market"] for g in groups.values()} == {"ON_DEMAND"}


def test_bootstrap_action_runs_the_versioned_script():
    req = build_request(ClusterOptions(bucket=BUCKET), CODE)
    (action,) = req["BootstrapActions"]
    script = action["ScriptBootstrapAction"]
    assert script["Path"] == "s3://fruits-eu/code/0.1.0-abc/bootstrap-emr.sh"
    # the wheel of the same code folder, its content hash as a PEP 440 local version
    assert script["Args"] == [
        "s3://fruits-eu/code/0.1.0-abc/fruits_pipeline-0.1.0+abc-py3-none-any.whl"
    ]


@pytest.mark.parametrize(
    "version, wheel",
    [
        ("0.1.0-0123456789ab", "fruits_pipeline-0.1.0+0123456789ab-py3-none-any.whl"),
        ("0.2.0", "fruits_pipeline-0.2.0-py3-none-any.whl"),
    ],
)
def test_wheel_name_follows_the_code_version(version, wheel):
    assert spec.wheel_name(version) == wheel
    assert spec.code_version(code_uri(BUCKET, version)) == version


def test_spark_env_points_pyspark_at_python311():
    env = _classification(build_request(ClusterOptions(bucket=BUCKET), CODE), "spark-env")
    (export,) = env["Configurations"]
    assert export["Classification"] == "export"
    assert export["Properties"] == {
        "PYSPARK_PYTHON": "/usr/bin/python3.11",
        "PYSPARK_DRIVER_PYTHON": "/usr/bin/python3.11",
    }


def test_notebook_adds_jupyterhub_livy_and_s3_persistence():
    plain = build_request(ClusterOptions(bucket=BUCKET), CODE)
    notebook_only = ("jupyter-s3-conf", "livy-conf", "livy-env", "jupyter-sparkmagic-conf")
    assert not [c for c in plain["Configurations"] if c["Classification"] in notebook_only]
    req = build_request(ClusterOptions(bucket=BUCKET, notebook=True), CODE)
    assert [a["Name"] for a in req["Applications"]] == ["Spark", "JupyterHub", "Livy"]
    conf = _classification(req, "jupyter-s3-conf")
    assert conf["Properties"] == {
        "s3.persistence.enabled": "true",
        "s3.persistence.bucket": "fruits-eu",
    }
    assert spec.notebook_key() == "jupyter/jovyan/fruits_pipeline.ipynb"


def test_notebook_livy_sessions_run_python311_in_cluster_mode_with_a_timeout():
    req = build_request(ClusterOptions(bucket=BUCKET, notebook=True), CODE)
    livy = _classification(req, "livy-conf")["Properties"]
    assert livy["livy.spark.deploy-mode"] == "cluster"  # the driver on a core node
    assert livy["livy.server.session.timeout-check"] == "true"
    assert livy["livy.server.session.timeout"] == "1h"
    (export,) = _classification(req, "livy-env")["Configurations"]
    assert export["Classification"] == "export"
    assert export["Properties"]["PYSPARK_PYTHON"] == "/usr/bin/python3.11"


@pytest.mark.parametrize("instance_type", ["m5.large", "c5.xlarge", "r5.xlarge"])
def test_notebook_sessions_get_the_step_layout_not_sparkmagics_defaults(instance_type):
    opts = ClusterOptions(bucket=BUCKET, notebook=True, instance_type=instance_type)
    req = build_request(opts, CODE)
    props = _classification(req, "jupyter-sparkmagic-conf")["Properties"]
    # EMR writes each property into sparkmagic's config.json: nested objects as JSON text
    session = json.loads(props["session_configs"])
    defaults = _classification(req, "spark-defaults")["Properties"]
    lay = sizing.executor_layout(instance_type)
    # sparkmagic's own executorCores 2 would put two Python workers in a one-worker executor
    assert session["executorCores"] == lay.cores == int(defaults["spark.executor.cores"])
    assert session["conf"]["spark.task.cpus"] == defaults["spark.task.cpus"]
    assert session["executorCores"] // int(session["conf"]["spark.task.cpus"]) == 1
    assert session["executorMemory"] == defaults["spark.executor.memory"]
    assert (
        session["conf"]["spark.executor.memoryOverhead"]
        == (defaults["spark.executor.memoryOverhead"])
    )
    # the driver builds the model once in its Python process: a step driver's container
    assert session["driverMemory"] == defaults["spark.driver.memory"]
    overhead = _mib(session["conf"]["spark.driver.memoryOverhead"])
    assert overhead >= sizing.DRIVER_PYTHON_MIB  # the driver builds and converts the model
    assert session["conf"]["spark.driver.memoryOverhead"] == defaults["spark.driver.memoryOverhead"]
    conf = session["conf"]
    assert conf["spark.pyspark.python"] == "/usr/bin/python3.11"
    assert conf["spark.yarn.appMasterEnv.PYSPARK_PYTHON"] == "/usr/bin/python3.11"


def test_task_nodes_on_spot_with_managed_scaling():
    opts = ClusterOptions(bucket=BUCKET, core=2, task=3, spot=True, max_instances=8)
    req = build_request(opts, CODE)
    groups = _groups(req)
    assert groups["TASK"]["Market"] == "SPOT"
    assert groups["TASK"]["InstanceCount"] == 3
    assert groups["CORE"]["Market"] == "ON_DEMAND"
    limits = req["ManagedScalingPolicy"]["ComputeLimits"]
    assert limits["UnitType"] == "Instances"
    assert limits["MinimumCapacityUnits"] == 2
    assert limits["MaximumCapacityUnits"] == 8
    assert limits["MaximumCoreCapacityUnits"] == 2  # only task nodes grow
    assert limits["MaximumOnDemandCapacityUnits"] == 2  # growth is on Spot


def test_roles_idle_timeout_and_instance_type_are_overridable():
    opts = ClusterOptions(
        bucket=BUCKET,
        service_role="MyEmrRole",
        job_flow_role="MyProfile",
        idle_timeout=600,
        instance_type="m5.xlarge",
        subnet_id="subnet-123",
    )
    req = build_request(opts, CODE)
    assert (req["ServiceRole"], req["JobFlowRole"]) == ("MyEmrRole", "MyProfile")
    assert req["AutoTerminationPolicy"] == {"IdleTimeout": 600}
    assert req["Instances"]["Ec2SubnetId"] == "subnet-123"
    assert {g["InstanceType"] for g in req["Instances"]["InstanceGroups"]} == {"m5.xlarge"}


def test_featurize_step_arguments():
    step = stage_step(
        "featurize",
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Features/",
        CODE,
        ["--weights", "imagenet"],
    )
    assert step["Name"] == "fruits-pipeline featurize"
    assert step["ActionOnFailure"] == "CONTINUE"
    assert step["HadoopJarStep"]["Jar"] == "command-runner.jar"
    assert step["HadoopJarStep"]["Args"] == [
        "spark-submit",
        "--deploy-mode",
        "cluster",
        "s3://fruits-eu/code/0.1.0-abc/featurize.py",
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Features/",
        "--weights",
        "imagenet",
    ]


def test_reduce_step_terminates_cluster_on_failure_when_asked():
    step = stage_step(
        "reduce",
        "s3a://fruits-eu/Features/",
        "s3a://fruits-eu/Results/",
        CODE,
        ["--k", "50"],
        action_on_failure="TERMINATE_CLUSTER",
    )
    args = step["HadoopJarStep"]["Args"]
    assert step["ActionOnFailure"] == "TERMINATE_CLUSTER"
    assert args[3] == "s3://fruits-eu/code/0.1.0-abc/reduce.py"
    assert args[4:] == ["s3a://fruits-eu/Features/", "s3a://fruits-eu/Results/", "--k", "50"]


@pytest.mark.parametrize(
    "stage, inp, match",
    [
        ("train", "s3://fruits-eu/Test/", "unknown stage 'train'"),
        ("featurize", "/home/me/Test", "is not an S3 URI"),
        ("featurize", "gs://fruits-eu/Test/", "is not an S3 URI"),
    ],
)
def test_step_refuses_bad_stage_or_path(stage, inp, match):
    with pytest.raises(UsageError, match=match):
        stage_step(stage, inp, "s3://fruits-eu/Features/", CODE)


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(region="us-east-1"), "outside the EU"),
        (dict(region="eu-west-2"), "outside the EU"),
        (dict(spot=True), "--spot applies to task nodes"),
        (dict(core=0), "--core 0 must be at least 1"),
        (dict(task=-1), "--task -1 must be 0 or more"),
        (dict(idle_timeout=30), "--idle-timeout 30 must be between 60"),
        (dict(task=2, max_instances=3), "--max-instances 3 is below the 4"),
        (dict(instance_type="t2.micro"), "'t2.micro' is not in the sizing table"),
        (dict(bucket="Bad_Bucket"), "bucket name 'Bad_Bucket' is not valid"),
    ],
)
def test_validate_options_refuses(opts, match):
    kwargs = {"bucket": BUCKET, **opts}
    with pytest.raises(UsageError, match=match):
        spec.validate_options(ClusterOptions(**kwargs))


@pytest.mark.parametrize("engine", ["litert", "keras"])
@pytest.mark.parametrize("instance_type", sorted(sizing.INSTANCE_TYPES))
def test_spark_defaults_fit_yarn_with_the_engines_python_worker(instance_type, engine):
    it = sizing.INSTANCE_TYPES[instance_type]
    conf = classifications.spark_defaults(instance_type, engine)
    lay = sizing.executor_layout(instance_type, engine)
    cores = int(conf["spark.executor.cores"])
    task_cpus = int(conf["spark.task.cpus"])
    heap = _mib(conf["spark.executor.memory"])
    overhead = _mib(conf["spark.executor.memoryOverhead"])
    workers_per_executor = cores // task_cpus
    executors_per_node = it.vcpu // cores
    assert executors_per_node >= 1
    # what YARN hands out on one node stays within its memory
    assert executors_per_node * (heap + overhead) <= it.yarn_mib
    # each Python worker gets its engine's measured need beside Spark's 384 MiB floor
    need = {"litert": 768, "keras": 2048}[engine]
    assert (overhead - 384) / workers_per_executor >= need
    assert heap >= 450  # Spark refuses smaller executors
    assert executors_per_node * task_cpus == it.vcpu  # no idle core
    # the driver's Python has room for the TFLite conversion (1.06 GB measured), and
    # its container takes the room of driver_slots executors, no more
    assert _mib(conf["spark.driver.memoryOverhead"]) - 384 >= 1536
    driver = _mib(conf["spark.driver.memory"]) + _mib(conf["spark.driver.memoryOverhead"])
    assert _mib(conf["spark.driver.memory"]) >= 450
    assert driver <= lay.driver_slots * (heap + overhead)


def test_m5_large_runs_two_single_core_executors_per_node():
    conf = classifications.spark_defaults("m5.large")
    assert conf["spark.executor.cores"] == "1"
    per_executor = _mib(conf["spark.executor.memory"]) + _mib(conf["spark.executor.memoryOverhead"])
    assert 2 * per_executor <= 6144


def test_memory_bound_c5_gives_each_keras_worker_two_threads():
    conf = classifications.spark_defaults("c5.xlarge", "keras")  # 4 vCPU but only 6 GiB for YARN
    assert conf["spark.task.cpus"] == "2"
    assert conf["spark.executor.cores"] == "2"


def test_regression_no_pyspark_memory_rlimit_for_tensorflow():
    # spark.executor.pyspark.memory sets RLIMIT_AS, a cap on virtual memory that
    # TensorFlow exceeds by far (3.0 GB virtual for 1.6 GB resident, measured).
    for instance_type in sizing.INSTANCE_TYPES:
        conf = classifications.spark_defaults(instance_type)
        assert "spark.executor.pyspark.memory" not in conf
        assert conf["spark.python.worker.reuse"] == "true"
        assert conf["spark.sql.files.openCostInBytes"] == "65536"
        assert conf["spark.pyspark.python"] == "/usr/bin/python3.11"


def test_hourly_cost_counts_every_node():
    cost = costs.hourly_cost(
        ClusterOptions(bucket=BUCKET, core=2, task=1, instance_type="m5.xlarge")
    )
    it = sizing.INSTANCE_TYPES["m5.xlarge"]
    ebs = (32 + 64) * costs.EBS_USD_PER_GIB_MONTH / costs.HOURS_PER_MONTH
    assert cost["nodes"] == 4
    assert cost["ec2_usd"] == pytest.approx(4 * it.ec2_usd)
    assert cost["ebs_usd"] == pytest.approx(4 * ebs, abs=1e-4)
    assert cost["total_usd"] == pytest.approx(4 * (it.ec2_usd + it.emr_usd + ebs), abs=1e-4)


def test_step_log_uri_follows_emr_layout():
    uri = spec.step_log_uri("s3://fruits-eu/logs/emr/", "j-ABC", "s-XYZ")
    assert uri == "s3://fruits-eu/logs/emr/j-ABC/steps/s-XYZ/"
    assert spec.step_log_uri("s3://fruits-eu/logs/emr", "j-ABC", "s-XYZ") == uri
