"""`fruits-pipeline bucket|emr` through stages.cli.main: bad input is one line and exit 2."""

from __future__ import annotations

import json
import re

import moto  # a test dependency (pyproject's [test] extra)
import pytest

from cluster import spec
from stages.cli import build_parser, main


@pytest.fixture(autouse=True)
def no_real_aws(monkeypatch):
    """Fake credentials under moto: a test that reached AWS by mistake stays offline."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EMR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with moto.mock_aws():
        yield


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fruits-pipeline: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["emr", "plan", "--bucket", "fruits-eu", "--region", "us-east-1"], "outside the EU"),
        (["emr", "plan", "--bucket", "fruits-eu", "--region", "eu-west-2"], "outside the EU"),
        (["emr", "plan", "--bucket", "fruits-eu", "--spot"], "--spot applies to task nodes"),
        (["emr", "plan", "--bucket", "Bad_Bucket"], "bucket name 'Bad_Bucket' is not valid"),
        (
            ["emr", "plan", "--bucket", "fruits-eu", "--instance-type", "t2.micro"],
            "'t2.micro' is not in the sizing table: use one of m5.large",
        ),
        (["emr", "plan", "--bucket", "fruits-eu", "--core", "0"], "--core 0 must be at least 1"),
        (["emr", "plan", "--bucket", "fruits-eu", "--idle-timeout", "10"], "between 60 and 604800"),
        (
            ["emr", "plan", "--bucket", "fruits-eu", "--task", "1", "--max-instances", "2"],
            "--max-instances 2 is below the 3",
        ),
        (["emr", "up", "--bucket", "fruits-eu", "--region", "us-east-1"], "outside the EU"),
        (["emr", "run", "s3://fruits-eu/Test/", "gs://fruits-eu/Results/"], "is not an S3 URI"),
        (["emr", "run", "/data/Test", "s3://fruits-eu/Results/"], "is not an S3 URI"),
        (
            ["emr", "run", "s3://bucket-one/Test/", "s3://bucket-two/Results/"],
            "the paths span buckets bucket-one, bucket-two: pass --bucket",
        ),
        (
            [
                "emr",
                "submit",
                "j-1",
                "featurize",
                "s3://fruits-eu/T/",
                "s3://fruits-eu/F/",
                "--weights",
                "bundled",
                "--alpha",
                "1.0",
            ],
            "--weights bundled is MobileNetV2 alpha 0.35, not 1.0: drop --alpha",
        ),  # fmt: skip
        (["emr", "policy", "--bucket", "fruits-eu", "--read", "Test/*"], "is not valid"),
        (["bucket", "create", "x", "--region", "eu-west-3"], "bucket name 'x' is not valid"),
        (["bucket", "create", "fruits-eu", "--region", "eu-central-2"], "outside the EU"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in _one_line(capsys)


def test_no_credentials_is_one_line(monkeypatch, capsys, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["emr", "status", "j-ANY"]) == 2
    assert "no AWS credentials" in _one_line(capsys)


def _eu_bucket(name: str = "fruits-eu", region: str = "eu-west-3") -> None:
    import boto3

    # us-east-1 is the one region that takes no location constraint.
    where = {} if region == "us-east-1" else {"LocationConstraint": region}
    boto3.client("s3", region_name=region).create_bucket(
        Bucket=name, **({"CreateBucketConfiguration": where} if where else {})
    )


def test_plan_prints_the_request_and_creates_nothing(capsys):
    import boto3

    _eu_bucket()
    argv = ["emr", "plan", "--bucket", "fruits-eu", "--core", "3", "--instance-type", "m5.xlarge"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    request = json.loads(captured.out)
    assert request["ReleaseLabel"] == "emr-7.6.0"
    assert request["LogUri"] == "s3://fruits-eu/logs/emr/"
    path = request["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"]
    assert re.fullmatch(r"s3://fruits-eu/code/\d+\.\d+\.\d+-[0-9a-f]{12}/bootstrap-emr\.sh", path)
    core = [g for g in request["Instances"]["InstanceGroups"] if g["InstanceRole"] == "CORE"][0]
    assert (core["InstanceType"], core["InstanceCount"]) == ("m5.xlarge", 3)
    assert "4 x m5.xlarge in eu-west-3" in captured.err
    assert "nothing created" in captured.err
    assert boto3.client("emr", region_name="eu-west-3").list_clusters()["Clusters"] == []
    s3 = boto3.client("s3", region_name="eu-west-3")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["fruits-eu"]
    assert "Contents" not in s3.list_objects_v2(Bucket="fruits-eu")  # no code uploaded


def test_plan_refuses_a_bucket_outside_the_eu_as_up_does(capsys):
    # Regression: the dry run skipped the bucket-location (GDPR) check that `up` makes.
    _eu_bucket("fruits-us", "us-east-1")
    results = {}
    for action in ("plan", "up"):
        code = main(["emr", action, "--bucket", "fruits-us", "--region", "eu-west-3"])
        results[action] = (code, _one_line(capsys))
    assert results["plan"] == results["up"]
    assert results["plan"][0] == 2 and "outside the EU" in results["plan"][1]


def test_plan_refuses_a_missing_bucket_as_up_does(capsys):
    results = {}
    for action in ("plan", "up"):
        code = main(["emr", action, "--bucket", "fruits-none"])
        results[action] = (code, _one_line(capsys))
    assert results["plan"] == results["up"]
    assert results["plan"][0] == 2 and "does not exist" in results["plan"][1]


@pytest.mark.parametrize(
    "argv",
    [
        ["emr", "--quiet", "plan", "--bucket", "fruits-eu"],
        ["emr", "plan", "--quiet", "--bucket", "fruits-eu"],
    ],
)
def test_quiet_is_accepted_at_each_level(capsys, argv):
    _eu_bucket()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["ReleaseLabel"] == spec.RELEASE_LABEL


@pytest.mark.parametrize(
    "argv",
    [
        ["emr", "-v", "plan", "--bucket", "fruits-eu"],
        ["emr", "plan", "--verbose", "--bucket", "fruits-eu"],
    ],
)
def test_verbose_adds_detail_lines_and_keeps_the_output(capsys, argv):
    _eu_bucket()
    assert main(argv) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert "guard: bucket fruits-eu is in eu-west-3: in the EU" in err  # a DEBUG line
    assert err[0].startswith("fruits-pipeline emr ")  # the argv and the log file's path
    assert any(line.startswith("emr plan: 3 x m5.large in eu-west-3") for line in err)
    assert not any("botocore" in line or "DEBUG" in line for line in err), err  # no flood
    assert json.loads(captured.out)["ReleaseLabel"] == spec.RELEASE_LABEL


def test_default_shows_progress_not_detail(capsys):
    _eu_bucket()
    assert main(["emr", "plan", "--bucket", "fruits-eu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("emr plan: 3 x m5.large in eu-west-3"), err
    # then the estimate and what would be set up, and nothing else (no detail lines)
    assert [line.split(":")[0] for line in err[1:]] == ["estimate", "tag"], err
    assert "start-up alone" in err[1]


def test_the_run_log_file_gets_every_line_even_when_quiet(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FRUITS_LOG_DIR", str(tmp_path))
    _eu_bucket()
    assert main(["emr", "plan", "--quiet", "--bucket", "fruits-eu"]) == 0
    assert capsys.readouterr().err == ""
    (log,) = tmp_path.glob("fruits-pipeline-*.log")
    lines = log.read_text(encoding="utf-8").splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}"
    first = r" DEBUG stages\.cli: fruits-pipeline emr plan --quiet .+"
    assert re.fullmatch(stamp + first, lines[0]), lines
    assert any(
        re.fullmatch(stamp + r" DEBUG cluster\.guard: guard: bucket fruits-eu is in eu-west-3.*", x)
        for x in lines
    ), lines
    assert any(
        re.fullmatch(stamp + r" INFO cluster\.cli: emr plan: 3 x m5\.large in eu-west-3.*", x)
        for x in lines
    ), lines


def test_quiet_and_verbose_together_are_one_line_exit_2(capsys):
    assert main(["emr", "plan", "--quiet", "-v", "--bucket", "fruits-eu"]) == 2
    assert "--quiet and -v contradict each other" in _one_line(capsys)


def test_every_added_parser_accepts_quiet():
    parser = build_parser()
    for argv in (
        ["bucket", "--quiet", "create", "--quiet", "fruits-eu"],
        [
            "emr",
            "--quiet",
            "submit",
            "--quiet",
            "j-1",
            "featurize",
            "--quiet",
            "s3://b-b/T/",
            "s3://b-b/F/",
        ],
        ["emr", "run", "--quiet", "s3://b-b/T/", "s3://b-b/R/"],
        ["emr", "status", "--quiet", "j-1"],
        ["emr", "down", "--quiet", "j-1"],
        ["emr", "policy", "--quiet", "--bucket", "b-b"],
        ["emr", "up", "--quiet", "--bucket", "b-b"],
    ):
        args = parser.parse_args(argv)
        assert args.quiet is True, argv
        assert callable(args.func)
        verbose = parser.parse_args([a if a != "--quiet" else "-v" for a in argv])
        assert (verbose.quiet, verbose.verbose) == (False, 1), argv


def test_help_lists_the_aws_commands():
    text = build_parser().format_help()
    assert "bucket" in text and "emr" in text


def test_region_defaults_to_paris_not_to_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    _eu_bucket()
    assert main(["emr", "plan", "--bucket", "fruits-eu"]) == 0
    assert "in eu-west-3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["emr", "run", "s3://fruits-eu/Test/", "s3://fruits-eu/R/", "--k", "0"],
         "argument --k: 0 must be at least 1"),
        (["emr", "submit", "j-1", "reduce", "s3://fruits-eu/F/", "s3://fruits-eu/R/",
          "--variance", "1.5"], "argument --variance: 1.5 must be in (0, 1]"),
    ],
)  # fmt: skip
def test_emr_stage_options_are_checked_by_the_same_parser_before_aws(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert fragment in _one_line(capsys)
