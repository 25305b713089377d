"""The S3A settings the CLI gives Spark follow boto3 (no JVM here), and a missing
connector is one line that says how to get it."""

from __future__ import annotations

import pytest

from stages.base import s3a
from stages.base.errors import UsageError
from stages.cli import main


@pytest.fixture
def clean_aws(monkeypatch, tmp_path):
    for var in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def test_the_pinned_jars_are_found_and_verified():
    jars = s3a.find_jars()
    assert [j.rsplit("/", 1)[-1] for j in jars] == list(s3a.S3A_JARS)


def test_endpoint_s3_wins_over_the_global_one_as_in_boto3(clean_aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://global.example:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9100")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    conf = s3a.s3a_conf()
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9100"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.access.key"] == "AKIDEXAMPLE"
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith(
        "SimpleAWSCredentialsProvider"
    )
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-3"  # Paris by default
    assert conf["spark.jars"].count(".jar") == 2


def test_profile_credentials_and_session_tokens_reach_s3a(clean_aws, monkeypatch):
    (clean_aws / "credentials").write_text(
        "[team]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s2\n"
        "aws_session_token = tok\n"
    )
    (clean_aws / "config").write_text("[profile team]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_PROFILE", "team")
    conf = s3a.s3a_conf()
    assert conf["spark.hadoop.fs.s3a.access.key"] == "AKIDPROFILE"
    assert conf["spark.hadoop.fs.s3a.session.token"] == "tok"
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith(
        "TemporaryAWSCredentialsProvider"
    )
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-1"
    # Real AWS: no endpoint override, virtual-host addressing as S3A's default.
    assert "spark.hadoop.fs.s3a.endpoint" not in conf


def test_no_credentials_leaves_s3a_its_own_chain(clean_aws):
    conf = s3a.s3a_conf()
    assert not any(k.startswith("spark.hadoop.fs.s3a.access") for k in conf)
    assert "spark.hadoop.fs.s3a.aws.credentials.provider" not in conf


def test_missing_connector_is_one_line_before_spark_starts(monkeypatch, capsys):
    monkeypatch.setattr(s3a, "_jar_dir", lambda: "")
    with pytest.raises(UsageError, match="pip install --no-deps sagemaker_pyspark==1.4.5"):
        s3a.find_jars()
    assert main(["featurize", "s3a://b/Test/", "s3a://b/Features/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "S3A connector jar hadoop-aws-3.3.1.jar" in err


def test_a_jar_that_is_not_the_pinned_one_is_refused(monkeypatch, tmp_path):
    for name in s3a.S3A_JARS:
        (tmp_path / name).write_bytes(b"not the jar")
    monkeypatch.setattr(s3a, "_jar_dir", lambda: str(tmp_path))
    with pytest.raises(UsageError, match="SHA-256 differs"):
        s3a.find_jars()


def test_needs_s3a_only_for_s3a_uris():
    assert s3a.needs_s3a(["/local", "S3A://b/k", None])
    assert not s3a.needs_s3a(["s3://b/k", "file:/x", None])
