"""--max-cost, --budget and --ssh-from against moto's in-process AWS: what exists, read back.

Every AWS call the CLI makes is recorded (a botocore ``before-call`` hook on each client
it creates), so "refused before anything is created" is checked on the calls themselves,
not only on what is left afterwards.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import boto3
import moto  # a test dependency (pyproject's [test] extra)
import pytest

from cluster import budget, costs, deadline, emr, launch, network, package
from cluster.spec import ClusterOptions
from stages.cli import main

REGION = "eu-west-3"
BUCKET = "fruits-eu"
_BUNDLE = []
_build_bundle = package.build_bundle
# Calls that read or check; anything else creates, changes or deletes.
_READS = {"GetBucketLocation", "ListObjectsV2", "GetCallerIdentity", "DescribeCluster"}


def _cached_bundle(base_version=None):
    if not _BUNDLE:  # the zip costs ~0.5 s; the code does not change during a run
        _BUNDLE.append(_build_bundle())
    return _BUNDLE[0]


@pytest.fixture
def calls(monkeypatch):
    """moto, fake credentials, an EU bucket with two images; yields the calls made."""
    monkeypatch.setattr(package, "build_bundle", _cached_bundle)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EMR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    seen = []
    real_client = emr.client

    def recording_client(service, region):
        c = real_client(service, region)
        c.meta.events.register("before-call", lambda model, **_: seen.append(model.name))
        return c

    monkeypatch.setattr(emr, "client", recording_client)
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        for key in ("Test/Apple Braeburn/0_100.jpg", "Test/Banana/1_100.jpg", "Test/notes.txt"):
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"\xff\xd8\xff")
        yield seen


def _one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    assert err.startswith("fruits-pipeline: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def _subnet():
    return boto3.client("ec2", region_name=REGION).describe_subnets()["Subnets"][0]["SubnetId"]


def _tags(cluster_id):
    info = boto3.client("emr", region_name=REGION).describe_cluster(ClusterId=cluster_id)
    return {t["Key"]: t["Value"] for t in info["Cluster"]["Tags"]}


def _state(cluster_id):
    info = boto3.client("emr", region_name=REGION).describe_cluster(ClusterId=cluster_id)
    return info["Cluster"]["Status"]["State"]


# ------------------------------------------------------------------ --max-cost


@pytest.mark.parametrize("command", ["run", "up", "plan"])
def test_max_cost_below_the_estimate_refuses_before_any_creating_call(calls, capsys, command):
    argv = {
        "run": ["emr", "run", f"s3://{BUCKET}/Test/", f"s3://{BUCKET}/Results/"],
        "up": ["emr", "up", "--bucket", BUCKET],
        "plan": ["emr", "plan", "--bucket", BUCKET],
    }[command]
    limit = ["--images", "10000000", "--max-cost", "5", "--budget", "5"]
    assert main([*argv, *limit, "--alert-email", "ops@example.eu"]) == 2
    err = _one_line_error(capsys, "is above --max-cost 5.00")
    est = costs.estimate(ClusterOptions(bucket=BUCKET), 10_000_000, "--images")
    assert f"estimated {est.total_usd:.2f} USD" in err  # the estimate shown
    assert set(calls) <= _READS, calls  # looked, created nothing
    s3 = boto3.client("s3", region_name=REGION)
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix="code/").get("Contents")
    assert boto3.client("emr", region_name=REGION).list_clusters()["Clusters"] == []
    budgets = boto3.client("budgets", region_name="us-east-1")
    assert not budgets.describe_budgets(AccountId="123456789012").get("Budgets")


def test_run_counts_the_input_images_for_its_estimate(calls, capsys):
    argv = ["emr", "run", f"s3://{BUCKET}/Test/", f"s3://{BUCKET}/Results/", "--max-cost", "1e-3"]
    assert main(argv) == 2
    # 2 .jpg objects (notes.txt is not an image), counted with one LIST page
    assert "for 2 images on 3 x m5.large" in _one_line_error(capsys, "above --max-cost")


def test_deadline_schedule_has_the_right_time_and_down_removes_it(calls, capsys):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    argv = ["emr", "up", "--bucket", BUCKET, "--images", "1000", "--max-cost", "2", "--task", "1"]
    assert main([*argv, "--max-instances", "5"]) == 0
    after = datetime.now(timezone.utc)
    cluster_id = capsys.readouterr().out.strip()
    name = _tags(cluster_id)[deadline.DEADLINE_TAG]
    assert name == f"fruits-pipeline-{cluster_id}"
    sched = boto3.client("scheduler", region_name=REGION).get_schedule(Name=name)
    opts = ClusterOptions(bucket=BUCKET, task=1, max_instances=5)
    est = costs.estimate(opts, 1000, "--images")
    # (2 USD - the S3 requests) at the most 6 nodes on-demand can cost an hour
    span = (2 - est.usd["s3_requests"]) / costs.ceiling_per_hour(opts) * 3600
    when = datetime.strptime(sched["ScheduleExpression"], "at(%Y-%m-%dT%H:%M:%S)")
    when = when.replace(tzinfo=timezone.utc)
    assert before + timedelta(seconds=span - 1) <= when <= after + timedelta(seconds=span)
    assert sched["ScheduleExpressionTimezone"] == "UTC"
    assert sched["ActionAfterCompletion"] == "DELETE"
    assert sched["FlexibleTimeWindow"] == {"Mode": "OFF"}
    target = sched["Target"]
    assert target["Arn"] == "arn:aws:scheduler:::aws-sdk:emr:terminateJobFlows"
    assert json.loads(target["Input"]) == {"JobFlowIds": [cluster_id]}
    role = boto3.client("iam", region_name=REGION).get_role(RoleName=deadline.ROLE_NAME)["Role"]
    assert target["RoleArn"] == role["Arn"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "scheduler.amazonaws.com"}
    # and the cluster its target names is terminable by that role's one permission
    policy = boto3.client("iam", region_name=REGION).get_role_policy(
        RoleName=deadline.ROLE_NAME, PolicyName="terminate-fruits-pipeline-clusters"
    )["PolicyDocument"]
    assert policy["Statement"][0]["Action"] == "elasticmapreduce:TerminateJobFlows"
    assert _tags(cluster_id)["project"] == "fruits-pipeline"  # the policy's condition

    assert main(["emr", "down", cluster_id, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deadline_removed"] == name and _state(cluster_id) == "TERMINATED"
    with pytest.raises(Exception, match="ResourceNotFound"):
        boto3.client("scheduler", region_name=REGION).get_schedule(Name=name)


def test_a_failed_deadline_terminates_the_new_cluster(calls, capsys, monkeypatch):
    from botocore.exceptions import ClientError

    def refused(*args, **kwargs):
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CS")

    monkeypatch.setattr(deadline, "create_deadline", refused)
    assert main(["emr", "up", "--bucket", BUCKET, "--max-cost", "2", "--quiet"]) == 2
    assert "AWS refused CS: AccessDeniedException" in capsys.readouterr().err
    (cluster,) = boto3.client("emr", region_name=REGION).list_clusters()["Clusters"]
    assert cluster["Status"]["State"] == "TERMINATED"  # not left running without its limit


def test_max_cost_that_does_not_pay_for_the_start_up_is_refused(calls, capsys):
    # 3 nodes start for ~0.06 USD, but managed scaling may grow them to 41: the deadline
    # counts every node the cluster may have, and 0.10 USD buys ~1 min of that
    argv = ["emr", "up", "--bucket", BUCKET, "--max-cost", "0.1", "--max-instances", "40"]
    assert main(argv) == 2
    _one_line_error(capsys, "less than its ~8m00s start-up")
    assert set(calls) <= _READS, calls


# ------------------------------------------------------------------ --budget


def test_budget_filters_on_the_run_tag_with_both_notifications(calls, capsys):
    argv = ["emr", "up", "--bucket", BUCKET, "--budget", "12.5", "--quiet"]
    argv += ["--alert-email", "ops@example.eu", "--alert-email", "me@example.eu"]
    assert main(argv) == 0
    cluster_id = capsys.readouterr().out.strip()
    tags = _tags(cluster_id)
    run_id = tags[budget.RUN_TAG]
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", run_id)
    assert tags[budget.BUDGET_TAG] == f"fruits-pipeline-{run_id}"
    client = boto3.client("budgets", region_name="us-east-1")
    account = "123456789012"  # moto's
    got = client.describe_budget(AccountId=account, BudgetName=tags[budget.BUDGET_TAG])["Budget"]
    assert got["BudgetType"] == "COST"
    assert got["BudgetLimit"] == {"Amount": "12.50", "Unit": "USD"}
    assert got["CostFilters"] == {"TagKeyValue": [f"user:fruits-pipeline:run${run_id}"]}
    notes = client.describe_notifications_for_budget(
        AccountId=account, BudgetName=tags[budget.BUDGET_TAG]
    )["Notifications"]
    assert sorted((n["NotificationType"], n["Threshold"]) for n in notes) == [
        ("ACTUAL", 80.0),
        ("ACTUAL", 100.0),
    ]
    assert all(n["ComparisonOperator"] == "GREATER_THAN" for n in notes)
    # moto has no DescribeSubscribersForNotification: read what it stored
    from moto.budgets.models import budgets_backends

    stored = budgets_backends[account]["aws"].budgets[account][tags[budget.BUDGET_TAG]]
    for note in stored.notifications:
        addresses = sorted((s["SubscriptionType"], s["Address"]) for s in note.subscribers)
        assert addresses == [("EMAIL", "me@example.eu"), ("EMAIL", "ops@example.eu")]
    # `emr down` keeps it: bills reach Budgets hours late
    assert main(["emr", "down", cluster_id, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_kept"] == tags[budget.BUDGET_TAG]


def test_a_cluster_that_was_not_created_leaves_no_budget(calls, capsys, monkeypatch):
    from botocore.exceptions import ClientError

    def refused(*args, **kwargs):
        raise ClientError({"Error": {"Code": "ValidationException", "Message": "no"}}, "RJF")

    monkeypatch.setattr(emr, "create_cluster", refused)
    argv = ["emr", "up", "--bucket", BUCKET, "--budget", "5", "--alert-email", "a@b.eu"]
    assert main([*argv, "--quiet"]) == 2
    assert "AWS refused RJF: ValidationException" in capsys.readouterr().err
    assert "CreateBudget" in calls and "DeleteBudget" in calls
    budgets = boto3.client("budgets", region_name="us-east-1")
    assert not budgets.describe_budgets(AccountId="123456789012").get("Budgets")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--budget", "5"], "--budget needs --alert-email ADDR or --alert-sns"),
        (["--budget", "5", "--alert-email", "ops"], "'ops' is not an e-mail address"),
        (["--alert-email", "ops@example.eu"], "need --budget USD"),
        (["--budget", "0", "--alert-email", "a@b.eu"], "--budget 0 must be above 0"),
        (["--ssh-from", "0.0.0.0/0", "--key-name", "k"], "opens SSH to the whole internet"),
        (["--ssh-from", "::/0", "--key-name", "k"], "opens SSH to the whole internet"),
        (["--ssh-from", "10.0.0.0/8", "--key-name", "k"], "is a /8, wider than /16"),
        (["--ssh-from", "my-laptop", "--key-name", "k"], "is not an IP address or CIDR"),
        (["--ssh-from", "203.0.113.7"], "without --key-name no one can log in"),
        (["--ssh-from-anywhere"], "--ssh-from-anywhere goes with --ssh-from"),
        (["--max-cost", "-1"], "--max-cost -1 must be above 0 USD"),
    ],
)
def test_limit_and_access_options_are_checked_before_any_call(calls, capsys, extra, fragment):
    assert main(["emr", "up", "--bucket", BUCKET, *extra]) == 2
    _one_line_error(capsys, fragment)
    assert calls == []


# ------------------------------------------------------------------ --ssh-from


def _ssh_cidrs(group_id):
    ec2 = boto3.client("ec2", region_name=REGION)
    perms = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return sorted(
        r["CidrIp"] for p in perms["IpPermissions"] if p.get("FromPort") == 22
        for r in p.get("IpRanges", [])
    )  # fmt: skip


def test_ssh_rule_is_added_to_the_primary_group_and_removed_by_down(calls, capsys):
    argv = ["emr", "up", "--bucket", BUCKET, "--subnet", _subnet(), "--key-name", "k"]
    assert main([*argv, "--ssh-from", "203.0.113.7", "--quiet"]) == 0
    cluster_id = capsys.readouterr().out.strip()
    info = boto3.client("emr", region_name=REGION).describe_cluster(ClusterId=cluster_id)
    group = info["Cluster"]["Ec2InstanceAttributes"]["EmrManagedMasterSecurityGroup"]
    assert _ssh_cidrs(group) == ["203.0.113.7/32"]
    assert _tags(cluster_id)[network.SSH_TAG].startswith(group + "/sgr-")
    assert main(["emr", "down", cluster_id, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ssh_rule_removed"].startswith(group)
    assert _ssh_cidrs(group) == []


def test_ssh_rule_that_was_already_there_is_left_alone(calls, capsys):
    argv = ["emr", "up", "--bucket", BUCKET, "--subnet", _subnet(), "--key-name", "k", "--quiet"]
    assert main([*argv, "--ssh-from", "198.51.100.0/24"]) == 0
    first = capsys.readouterr().out.strip()
    assert main([*argv, "--ssh-from", "198.51.100.0/24"]) == 0  # same VPC, same group
    second = capsys.readouterr().out.strip()
    assert network.SSH_TAG not in _tags(second)  # not ours to remove
    assert main(["emr", "down", second, "--quiet"]) == 0
    group = _tags(first)[network.SSH_TAG].split("/")[0]
    assert _ssh_cidrs(group) == ["198.51.100.0/24"]  # the first cluster still has it


def test_plan_shows_the_rule_the_deadline_and_the_budget(calls, capsys):
    argv = ["emr", "plan", "--bucket", BUCKET, "--key-name", "k", "--ssh-from", "0.0.0.0/0"]
    argv += ["--ssh-from-anywhere", "--max-cost", "3", "--budget", "3"]
    assert main([*argv, "--alert-sns", "arn:aws:sns:eu-west-3:123456789012:alerts"]) == 0
    err = capsys.readouterr().err
    assert "ingress: tcp 22 from 0.0.0.0/0 on the primary node's security group" in err
    assert "deadline: AWS terminates the cluster " in err
    assert "budget: fruits-pipeline-" in err and "arn:aws:sns:eu-west-3:123456789012:alerts" in err
    assert set(calls) <= _READS, calls


def test_launch_lines_name_the_deadline_span():
    opts = ClusterOptions(bucket=BUCKET, max_cost=1.0, run_id="r")
    lines = launch.limit_lines(opts, 3600.0)
    assert any("1h00m after start" in line for line in lines)


@pytest.mark.cluster  # a dozen pip processes asking PyPI
def test_a_graviton_plan_resolves_every_pinned_wheel(calls, capsys):
    from tests.cluster.test_wheels import _pypi_unreachable

    reason = _pypi_unreachable()
    if reason:
        pytest.skip(reason)
    argv = ["emr", "plan", "--bucket", BUCKET, "--instance-type", "m7g.xlarge", "--images", "1000"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    if "not checked" in err:
        pytest.skip("PyPI did not answer pip: " + err)
    pins = package.bootstrap_pins(arch="aarch64")
    assert "tensorflow" in pins and "tensorflow-cpu" not in pins
    line = "emr: every pinned library has a CPython 3.11 aarch64 wheel: "
    assert line + ", ".join(f"{n}=={v}" for n, v in pins.items()) in err
    assert set(calls) <= _READS, calls
