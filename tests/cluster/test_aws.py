"""bucket/emr commands against moto's in-process AWS: what is really created, read back.

moto never runs a step: it leaves the first one RUNNING and the others PENDING.  The
tests check what was sent (list_steps/describe_step) and use ``--no-wait``; the waiter
itself is tested by setting a step's state in moto's backend.
"""

from __future__ import annotations

import json
import logging

import boto3
import moto  # a test dependency (pyproject's [test] extra)
import pytest

from cluster import classifications, emr, package, spec
from stages.base.errors import UsageError
from stages.cli import main

REGION = "eu-west-3"
_build_bundle = package.build_bundle
BUCKET = "fruits-eu"


_BUNDLE = []


def _cached_bundle(base_version=None):
    # Building the zip (2 MB of weights, deflated) costs ~0.5 s; the code does not
    # change during a test run.
    if not _BUNDLE:
        _BUNDLE.append(_build_bundle())
    return _BUNDLE[0]


@pytest.fixture
def aws(monkeypatch):
    """Fake credentials and moto's in-process AWS (no network)."""
    monkeypatch.setattr(package, "build_bundle", _cached_bundle)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EMR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the CLI must not rely on it
    with moto.mock_aws():
        yield


@pytest.fixture
def s3(aws):
    return boto3.client("s3", region_name=REGION)


@pytest.fixture
def emr_eu(aws):
    return boto3.client("emr", region_name=REGION)


@pytest.fixture
def eu_bucket(s3, capsys):
    """An EU bucket made by `bucket create`, with two images under Test/."""
    assert main(["bucket", "create", BUCKET, "--quiet"]) == 0
    capsys.readouterr()
    # moto evaluates a bucket policy's Deny without its Condition, so the TLS-only
    # policy would refuse every object call here; real S3 allows them over HTTPS.
    s3.delete_bucket_policy(Bucket=BUCKET)
    for key in ("Test/Apple Braeburn/0_100.jpg", "Test/Banana/1_100.jpg"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"\xff\xd8\xff")
    return BUCKET


@pytest.fixture
def us_bucket(aws):
    """A bucket located in us-east-1 holding images: data GDPR says must not be used."""
    s3_us = boto3.client("s3", region_name="us-east-1")
    s3_us.create_bucket(Bucket="us-images")
    s3_us.put_object(Bucket="us-images", Key="Test/Banana/1_100.jpg", Body=b"\xff\xd8\xff")
    return "us-images"


@pytest.fixture
def cluster_id(eu_bucket, capsys):
    assert main(["emr", "up", "--bucket", eu_bucket, "--quiet"]) == 0
    return capsys.readouterr().out.strip()


def _all_clusters():
    found = []
    for region in ("eu-west-3", "us-east-1", "eu-west-2"):
        client = boto3.client("emr", region_name=region)
        found += client.list_clusters()["Clusters"]
    return found


def _keys(s3_client, bucket, prefix=""):
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


def _one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    assert err.startswith("fruits-pipeline: error: "), err
    assert err.count("\n") == 1, err
    assert fragment in err, err
    return err


def _moto_step(cluster, step_id):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.emr.models import emr_backends

    backend = emr_backends[DEFAULT_ACCOUNT_ID][REGION]
    return [s for s in backend.clusters[cluster].steps if s.id == step_id][0]


# ------------------------------------------------------------------ bucket create


def test_bucket_create_sets_location_block_encryption_and_tls_policy(s3, capsys):
    assert main(["bucket", "create", BUCKET, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["created"] is True
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] == REGION
    block = s3.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"]
    assert block == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    rules = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    policy = json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])
    (deny,) = policy["Statement"]
    assert deny["Effect"] == "Deny"
    assert deny["Condition"]["Bool"]["aws:SecureTransport"] == "false"


def test_bucket_create_again_reapplies_settings(s3, capsys):
    assert main(["bucket", "create", BUCKET, "--quiet"]) == 0
    s3.delete_bucket_policy(Bucket=BUCKET)
    assert main(["bucket", "create", BUCKET]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["created"] is False
    assert "already exists and is yours" in captured.err
    assert "aws:SecureTransport" in s3.get_bucket_policy(Bucket=BUCKET)["Policy"]


def test_bucket_create_in_another_eu_region(aws, capsys):
    assert main(["bucket", "create", "fruits-de", "--region", "eu-central-1", "--quiet"]) == 0
    s3_de = boto3.client("s3", region_name="eu-central-1")
    assert s3_de.get_bucket_location(Bucket="fruits-de")["LocationConstraint"] == "eu-central-1"


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-2"])
def test_bucket_create_outside_eu_is_refused_and_creates_nothing(aws, capsys, region):
    assert main(["bucket", "create", "fruits-elsewhere", "--region", region]) == 2
    _one_line_error(capsys, f"region '{region}' is outside the EU")
    assert boto3.client("s3", region_name=region).list_buckets()["Buckets"] == []


# ------------------------------------------------------------------ emr up / status / down


def test_emr_up_creates_the_cluster_in_paris(eu_bucket, s3, emr_eu, capsys):
    assert main(["emr", "up", "--bucket", eu_bucket, "--quiet"]) == 0
    cluster = capsys.readouterr().out.strip()
    assert cluster.startswith("j-")
    info = emr_eu.describe_cluster(ClusterId=cluster)["Cluster"]
    assert f":{REGION}:" in info["ClusterArn"]
    assert info["ReleaseLabel"] == "emr-7.6.0"
    assert info["LogUri"] == "s3://fruits-eu/logs/emr/"
    tags = {t["Key"]: t["Value"] for t in info["Tags"]}
    assert tags["project"] == "fruits-pipeline"
    assert tags["data-residency"] == "eu"
    assert [a["Name"] for a in info["Applications"]] == ["Spark"]
    groups = emr_eu.list_instance_groups(ClusterId=cluster)["InstanceGroups"]
    by_role = {g["InstanceGroupType"]: g for g in groups}
    assert set(by_role) == {"MASTER", "CORE"}
    assert by_role["CORE"]["RequestedInstanceCount"] == 2
    assert by_role["CORE"]["InstanceType"] == "m5.large"
    # the code is where the bootstrap action and the tag say
    code = tags["code-uri"]
    (action,) = emr_eu.list_bootstrap_actions(ClusterId=cluster)["BootstrapActions"]
    assert action["ScriptPath"] == code + "bootstrap-emr.sh"
    prefix = code[len(f"s3://{BUCKET}/") :]
    wheel = spec.wheel_name(spec.code_version(code))
    assert sorted(k[len(prefix) :] for k in _keys(s3, BUCKET, prefix)) == [
        "bootstrap-emr.sh",
        "featurize.py",
        wheel,
        "reduce.py",
        "requirements-emr.txt",
        "watch.py",
    ]
    # the bootstrap installs that wheel
    assert action["Args"] == [code + wheel]
    assert _keys(s3, BUCKET, "jupyter/") == []  # no --notebook, no notebook


def test_emr_up_with_task_nodes_and_notebook(eu_bucket, s3, emr_eu, capsys):
    argv = ["emr", "up", "--bucket", eu_bucket, "--task", "1", "--notebook"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    cluster = captured.out.strip()
    info = emr_eu.describe_cluster(ClusterId=cluster)["Cluster"]
    assert sorted(a["Name"] for a in info["Applications"]) == ["JupyterHub", "Livy", "Spark"]
    roles = {
        g["InstanceGroupType"]
        for g in emr_eu.list_instance_groups(ClusterId=cluster)["InstanceGroups"]
    }
    assert roles == {"MASTER", "CORE", "TASK"}
    # what EMR received: Livy sessions on Python 3.11 with the steps' layout
    confs = {c["Classification"]: c for c in info["Configurations"]}
    assert confs["jupyter-s3-conf"]["Properties"]["s3.persistence.bucket"] == BUCKET
    assert confs["livy-conf"]["Properties"]["livy.spark.deploy-mode"] == "cluster"
    (export,) = confs["livy-env"]["Configurations"]
    assert export["Properties"]["PYSPARK_PYTHON"] == spec.PYTHON
    session = json.loads(confs["jupyter-sparkmagic-conf"]["Properties"]["session_configs"])
    assert session == classifications.livy_session_configs("m5.large")
    assert session["executorCores"] == 1  # m5.large: one Python worker per executor
    assert session["conf"]["spark.yarn.appMasterEnv.PYSPARK_PYTHON"] == spec.PYTHON
    # the notebook, where JupyterHub's default user opens it, ready for the cluster
    key = "jupyter/jovyan/fruits_pipeline.ipynb"
    assert f"emr: notebook uploaded to s3://{BUCKET}/{key}" in captured.err
    nb = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert nb["metadata"]["kernelspec"]["name"] == "pysparkkernel"
    (params,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert 'INPUT = "s3://fruits-eu/Test/"' in "".join(params["source"])


def test_emr_up_notebook_keeps_a_notebook_jupyterhub_saved(eu_bucket, s3, capsys):
    key = "jupyter/jovyan/fruits_pipeline.ipynb"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"edited": "by the user"}')
    assert main(["emr", "up", "--bucket", eu_bucket, "--notebook"]) == 0
    assert "exists (JupyterHub saved it): left as it is" in capsys.readouterr().err
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b'{"edited": "by the user"}'


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-2"])
def test_emr_up_outside_eu_is_refused_and_creates_nothing(eu_bucket, s3, capsys, region):
    assert main(["emr", "up", "--bucket", eu_bucket, "--region", region]) == 2
    _one_line_error(capsys, "outside the EU allow-list")
    assert _all_clusters() == []
    assert _keys(s3, BUCKET, "code/") == []


def test_emr_up_with_a_us_bucket_is_refused_and_creates_nothing(us_bucket, capsys):
    assert main(["emr", "up", "--bucket", us_bucket]) == 2
    _one_line_error(capsys, "bucket us-images is in us-east-1, outside the EU")
    assert _all_clusters() == []
    s3_us = boto3.client("s3", region_name="us-east-1")
    assert _keys(s3_us, us_bucket, "code/") == []


def test_emr_up_with_a_missing_bucket_says_how_to_create_it(aws, capsys):
    assert main(["emr", "up", "--bucket", "no-such-bucket"]) == 2
    _one_line_error(capsys, "fruits-pipeline bucket create no-such-bucket")
    assert _all_clusters() == []


def test_emr_up_wait_returns_once_the_cluster_is_ready(eu_bucket, emr_eu, capsys):
    assert main(["emr", "up", "--bucket", eu_bucket, "--wait"]) == 0
    captured = capsys.readouterr()
    cluster = captured.out.strip()
    assert f"emr: waiting for {cluster} to start" in captured.err
    state = emr_eu.describe_cluster(ClusterId=cluster)["Cluster"]["Status"]["State"]
    assert state in ("RUNNING", "WAITING")


def test_wait_running_explains_a_cluster_that_ended(cluster_id, emr_eu):
    emr_eu.terminate_job_flows(JobFlowIds=[cluster_id])
    with pytest.raises(UsageError, match=f"cluster {cluster_id} did not start: TERMINATED"):
        emr.wait_running(emr_eu, cluster_id, delay=0, max_attempts=1)


def test_emr_up_notes_a_bucket_in_another_eu_region(aws, capsys):
    assert main(["bucket", "create", "fruits-ie", "--region", "eu-west-1", "--quiet"]) == 0
    boto3.client("s3", region_name="eu-west-1").delete_bucket_policy(Bucket="fruits-ie")
    capsys.readouterr()
    assert main(["emr", "up", "--bucket", "fruits-ie"]) == 0
    err = capsys.readouterr().err
    assert "bucket fruits-ie is in eu-west-1, the cluster in eu-west-3" in err


def test_emr_status_and_down(cluster_id, emr_eu, capsys):
    assert main(["emr", "status", cluster_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["cluster"] == cluster_id
    assert status["release"] == "emr-7.6.0"
    assert status["region"] == REGION
    assert {g["role"] for g in status["instance_groups"]} == {"MASTER", "CORE"}
    assert status["state"] in ("STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING")

    assert main(["emr", "down", cluster_id, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"] == cluster_id
    state = emr_eu.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"]
    assert state in ("TERMINATING", "TERMINATED")
    assert out["state"] == state


def test_emr_down_unknown_cluster_is_one_line(aws, capsys):
    assert main(["emr", "down", "j-NOSUCHCLUSTER"]) == 2
    _one_line_error(capsys, "no cluster j-NOSUCHCLUSTER in eu-west-3")


# ------------------------------------------------------------------ emr submit


def test_submit_featurize_adds_the_step_it_should(cluster_id, emr_eu, capsys):
    argv = [
        "emr", "submit", cluster_id, "featurize", "s3://fruits-eu/Test/", "s3://fruits-eu/Features/",
        "--batch-size", "32", "--no-wait", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (listed,) = emr_eu.list_steps(ClusterId=cluster_id)["Steps"]
    assert out["step"] == listed["Id"]
    assert out["state"] in ("PENDING", "RUNNING")
    assert out["logs"] == f"s3://fruits-eu/logs/emr/{cluster_id}/steps/{listed['Id']}/"
    step = emr_eu.describe_step(ClusterId=cluster_id, StepId=listed["Id"])["Step"]
    code = spec.code_uri(BUCKET, "")[: -len("/")]  # s3://fruits-eu/code
    args = step["Config"]["Args"]
    assert step["Config"]["Jar"] == "command-runner.jar"
    assert step["ActionOnFailure"] == "CONTINUE"
    # no --py-files: the step imports the project the bootstrap installed
    assert args[:3] == ["spark-submit", "--deploy-mode", "cluster"]
    assert args[3].startswith(code) and args[3].endswith("/featurize.py")
    tags = {
        t["Key"]: t["Value"]
        for t in emr_eu.describe_cluster(ClusterId=cluster_id)["Cluster"]["Tags"]
    }
    assert args[3] == tags["code-uri"] + "featurize.py"
    assert args[4:] == [
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Features/",
        "--weights",
        "imagenet",
        "--batch-size",
        "32",
    ]


def test_submit_reduce_passes_k_and_overwrite(cluster_id, s3, emr_eu, capsys):
    s3.put_object(Bucket=BUCKET, Key="Features/part-0.parquet", Body=b"PAR1")
    s3.put_object(Bucket=BUCKET, Key="Results/summary.json", Body=b"{}")
    argv = [
        "emr", "submit", cluster_id, "reduce", "s3://fruits-eu/Features/", "s3://fruits-eu/Results/",
        "--k", "50", "--overwrite", "--no-wait", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    (listed,) = emr_eu.list_steps(ClusterId=cluster_id)["Steps"]
    args = listed["Config"]["Args"]
    assert args[3].endswith("/reduce.py")
    assert args[4:] == [
        "s3://fruits-eu/Features/",
        "s3://fruits-eu/Results/",
        "--k",
        "50",
        "--overwrite",
    ]


def test_submit_incremental_featurize_adds_to_an_existing_features(cluster_id, s3, emr_eu):
    s3.put_object(Bucket=BUCKET, Key="Features/run=1/part-0.parquet", Body=b"PAR1")
    argv = [
        "emr", "submit", cluster_id, "featurize", "s3://fruits-eu/Test/", "s3://fruits-eu/Features/",
        "--incremental", "--prune", "--no-wait", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    (listed,) = emr_eu.list_steps(ClusterId=cluster_id)["Steps"]
    args = listed["Config"]["Args"]
    assert args[3].endswith("/featurize.py")  # no --py-files: the nodes have the project
    assert args[4:] == [
        "s3://fruits-eu/Test/", "s3://fruits-eu/Features/", "--weights", "imagenet",
        "--incremental", "--prune",
    ]  # fmt: skip


def test_submit_reduce_update_may_find_its_results(cluster_id, s3, emr_eu, capsys):
    s3.put_object(Bucket=BUCKET, Key="Features/run=1/part-0.parquet", Body=b"PAR1")
    s3.put_object(Bucket=BUCKET, Key="Results/pca_model/model.json", Body=b"{}")
    argv = [
        "emr", "submit", cluster_id, "reduce", "s3://fruits-eu/Features/", "s3://fruits-eu/Results/",
        "--update", "--no-wait", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    (listed,) = emr_eu.list_steps(ClusterId=cluster_id)["Steps"]
    assert listed["Config"]["Args"][4:] == [
        "s3://fruits-eu/Features/", "s3://fruits-eu/Results/", "--update",
    ]  # fmt: skip


def test_submit_watch_available_now_is_a_step(cluster_id, s3, emr_eu, capsys):
    base = ["emr", "submit", cluster_id, "watch", "s3://fruits-eu/Test/", "s3://fruits-eu/F/"]
    assert main([*base, "--trigger", "30s", "--quiet"]) == 2
    _one_line_error(capsys, "never ends")
    argv = [*base, "--available-now", "--results", "s3://fruits-eu/Results/", "--no-wait"]
    assert main([*argv, "--quiet"]) == 0
    (listed,) = emr_eu.list_steps(ClusterId=cluster_id)["Steps"]
    args = listed["Config"]["Args"]
    assert args[3].endswith("/watch.py")
    assert args[4:] == [
        "s3://fruits-eu/Test/", "s3://fruits-eu/F/", "--weights", "imagenet",
        "--available-now", "--results", "s3://fruits-eu/Results/",
    ]  # fmt: skip


def test_submit_bundled_weights_use_the_copy_on_the_nodes(cluster_id, emr_eu, capsys):
    argv = [
        "emr", "submit", cluster_id, "featurize", "s3://fruits-eu/Test/", "s3://fruits-eu/Features/",
        "--weights", "bundled", "--no-wait", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    (listed,) = emr_eu.list_steps(ClusterId=cluster_id)["Steps"]
    args = listed["Config"]["Args"]
    i = args.index("--weights")
    assert args[i + 1] == f"{spec.NODE_WEIGHTS_DIR}/mobilenet_v2_imagenet_alpha0.35_224_no_top.h5"
    assert args[args.index("--alpha") + 1] == "0.35"


def test_submit_with_an_input_in_us_east_1_is_refused_and_adds_nothing(
    cluster_id, us_bucket, emr_eu, capsys
):
    argv = [
        "emr",
        "submit",
        cluster_id,
        "featurize",
        "s3://us-images/Test/",
        "s3://fruits-eu/Features/",
    ]
    assert main(argv) == 2
    _one_line_error(capsys, "bucket us-images is in us-east-1, outside the EU")
    assert emr_eu.list_steps(ClusterId=cluster_id)["Steps"] == []


def test_submit_refuses_existing_output_without_overwrite(cluster_id, s3, emr_eu, capsys):
    s3.put_object(Bucket=BUCKET, Key="Features/part-0.parquet", Body=b"PAR1")
    argv = [
        "emr",
        "submit",
        cluster_id,
        "featurize",
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Features/",
    ]
    assert main(argv) == 2
    _one_line_error(capsys, "output s3://fruits-eu/Features/ already exists: pass --overwrite")
    assert emr_eu.list_steps(ClusterId=cluster_id)["Steps"] == []


def test_submit_refuses_an_empty_input(cluster_id, emr_eu, capsys):
    argv = [
        "emr",
        "submit",
        cluster_id,
        "featurize",
        "s3://fruits-eu/Nothing/",
        "s3://fruits-eu/F2/",
    ]
    assert main(argv) == 2
    _one_line_error(capsys, "input s3://fruits-eu/Nothing/ holds no objects")
    assert emr_eu.list_steps(ClusterId=cluster_id)["Steps"] == []


def test_submit_to_an_unknown_cluster(eu_bucket, capsys):
    argv = ["emr", "submit", "j-NOPE", "featurize", "s3://fruits-eu/Test/", "s3://fruits-eu/F/"]
    assert main(argv) == 2
    _one_line_error(capsys, "no cluster j-NOPE in eu-west-3")


def test_submit_waits_and_reports_a_failed_step(cluster_id, emr_eu, monkeypatch, capsys):
    real_wait = emr.wait_step

    def fail_then_wait(client, cluster, step_id, **kw):
        _moto_step(cluster, step_id).state = "FAILED"
        return real_wait(client, cluster, step_id, delay=0)

    monkeypatch.setattr(emr, "wait_step", fail_then_wait)
    argv = ["emr", "submit", cluster_id, "featurize", "s3://fruits-eu/Test/", "s3://fruits-eu/F/"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["state"] == "FAILED"
    assert out["logs"].startswith(f"s3://fruits-eu/logs/emr/{cluster_id}/steps/s-")
    assert "waiting for step" in captured.err


# ------------------------------------------------------------------ the waiter


def test_wait_step_returns_when_the_step_completes(cluster_id, emr_eu):
    step = spec.stage_step(
        "featurize", "s3://fruits-eu/Test/", "s3://fruits-eu/F/", "s3://fruits-eu/code/v/"
    )
    step_id = emr.add_step(emr_eu, cluster_id, step)
    _moto_step(cluster_id, step_id).state = "COMPLETED"
    status = emr.wait_step(emr_eu, cluster_id, step_id, delay=0)
    assert status["state"] == "COMPLETED"
    assert status["name"] == "fruits-pipeline featurize"


def test_wait_step_gives_up_after_max_wait_with_a_progress_line(cluster_id, emr_eu, caplog):
    step = spec.stage_step(
        "reduce", "s3://fruits-eu/F/", "s3://fruits-eu/R/", "s3://fruits-eu/code/v/"
    )
    step_id = emr.add_step(emr_eu, cluster_id, step)
    caplog.set_level(logging.INFO, logger="cluster.emr")
    caplog.clear()  # add_step's line
    status = emr.wait_step(emr_eu, cluster_id, step_id, delay=0, max_wait_s=0, round_s=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "cluster.emr"]
    assert status["state"] == "RUNNING"
    assert lines[0].startswith(f"emr: waiting for step {step_id}")
    assert lines[-1].startswith(f"emr: step {step_id} RUNNING after")


# ------------------------------------------------------------------ emr run


def test_run_no_wait_starts_a_self_terminating_cluster_with_both_steps(eu_bucket, emr_eu, capsys):
    argv = [
        "emr",
        "run",
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Results/",
        "--k",
        "50",
        "--no-wait",
        "--quiet",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    cluster = out["cluster"]
    info = emr_eu.describe_cluster(ClusterId=cluster)["Cluster"]
    assert info["AutoTerminate"] is True  # KeepJobFlowAliveWhenNoSteps=False
    steps = list(reversed(emr_eu.list_steps(ClusterId=cluster)["Steps"]))
    assert [s["Id"] for s in steps] == out["steps"]
    assert [s["Name"] for s in steps] == ["fruits-pipeline featurize", "fruits-pipeline reduce"]
    assert {s["ActionOnFailure"] for s in steps} == {"TERMINATE_CLUSTER"}
    featurize_args = steps[0]["Config"]["Args"]
    reduce_args = steps[1]["Config"]["Args"]
    assert featurize_args[4:6] == ["s3://fruits-eu/Test/", "s3://fruits-eu/Features"]
    assert reduce_args[4:] == ["s3://fruits-eu/Features", "s3://fruits-eu/Results/", "--k", "50"]


def test_run_waits_for_both_steps_then_terminates(eu_bucket, emr_eu, monkeypatch, capsys):
    waited = []

    def complete(client, cluster, step_id, **kw):
        waited.append(step_id)
        _moto_step(cluster, step_id).state = "COMPLETED"
        return emr.step_status(client, cluster, step_id)

    monkeypatch.setattr(emr, "wait_step", complete)
    argv = ["emr", "run", "s3://fruits-eu/Test/", "s3://fruits-eu/Results/", "--quiet"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["state"] for s in out["steps"]] == ["COMPLETED", "COMPLETED"]
    assert [s["step"] for s in out["steps"]] == waited
    state = emr_eu.describe_cluster(ClusterId=out["cluster"])["Cluster"]["Status"]["State"]
    assert state in ("TERMINATING", "TERMINATED")


def test_run_stops_waiting_after_a_failed_featurize(eu_bucket, monkeypatch, capsys):
    def fail(client, cluster, step_id, **kw):
        _moto_step(cluster, step_id).state = "FAILED"
        return emr.step_status(client, cluster, step_id)

    monkeypatch.setattr(emr, "wait_step", fail)
    argv = ["emr", "run", "s3://fruits-eu/Test/", "s3://fruits-eu/Results/", "--quiet"]
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in out["steps"]] == ["fruits-pipeline featurize"]
    assert out["steps"][0]["state"] == "FAILED"


def test_run_that_stops_waiting_leaves_the_cluster_running(eu_bucket, emr_eu, monkeypatch, capsys):
    monkeypatch.setattr(emr, "wait_step", lambda c, cl, sid, **kw: emr.step_status(c, cl, sid))
    argv = ["emr", "run", "s3://fruits-eu/Test/", "s3://fruits-eu/Results/"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["steps"][0]["state"] == "RUNNING"
    state = emr_eu.describe_cluster(ClusterId=out["cluster"])["Cluster"]["Status"]["State"]
    assert state not in ("TERMINATING", "TERMINATED")
    assert "terminates itself after its steps" in captured.err


def test_run_with_results_in_a_us_bucket_is_refused_and_creates_nothing(
    eu_bucket, us_bucket, s3, capsys
):
    argv = ["emr", "run", "s3://fruits-eu/Test/", "s3://us-images/Results/", "--bucket", eu_bucket]
    assert main(argv) == 2
    _one_line_error(capsys, "bucket us-images is in us-east-1, outside the EU")
    assert _all_clusters() == []
    assert _keys(s3, BUCKET, "code/") == []


def test_run_with_input_in_a_us_bucket_is_refused_and_creates_nothing(us_bucket, capsys):
    argv = ["emr", "run", "s3://us-images/Test/", "s3://us-images/Results/"]
    assert main(argv) == 2
    _one_line_error(capsys, "bucket us-images is in us-east-1, outside the EU")
    assert _all_clusters() == []
    assert _keys(boto3.client("s3", region_name="us-east-1"), us_bucket, "code/") == []


def test_run_outside_eu_region_is_refused_and_creates_nothing(eu_bucket, s3, capsys):
    argv = [
        "emr",
        "run",
        "s3://fruits-eu/Test/",
        "s3://fruits-eu/Results/",
        "--region",
        "us-east-1",
    ]
    assert main(argv) == 2
    _one_line_error(capsys, "region 'us-east-1' is outside the EU")
    assert _all_clusters() == []
    assert _keys(s3, BUCKET, "code/") == []
