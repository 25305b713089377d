"""`bucket notifications` and the queue reader against moto's in-process AWS: the queue,
its policy and the bucket's notification are read back; uploads arrive as events with
their keys decoded; the test event is told apart; deletes remove messages."""

from __future__ import annotations

import json

import boto3
import moto
import pytest

from stages.cli import main
from stages.storage.fetch import StoreSettings
from stages.storage.s3events import EventQueue, parse_message

REGION = "eu-west-3"
BUCKET = "fruits-eu"


@pytest.fixture
def aws(monkeypatch):
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the command must not rely on it
    with moto.mock_aws():
        yield


@pytest.fixture
def s3(aws):
    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    return client


def _setup(capsys, *extra) -> dict:
    code = main(["bucket", "notifications", BUCKET, "--quiet", *extra])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_creates_queue_policy_and_notification(s3, capsys):
    other = {
        "Id": "someone-elses",
        "QueueArn": "arn:aws:sqs:eu-west-3:123456789012:other",
        "Events": ["s3:ObjectRemoved:*"],
    }
    boto3.client("sqs", region_name=REGION).create_queue(QueueName="other")
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": [other]}
    )
    first = _setup(capsys)
    again = _setup(capsys)  # idempotent: the same queue, still one configuration of ours
    assert first == again
    assert first["region"] == REGION and first["prefix"] == "Test/"
    sqs = boto3.client("sqs", region_name=REGION)
    attrs = sqs.get_queue_attributes(QueueUrl=first["queue_url"], AttributeNames=["All"])
    attrs = attrs["Attributes"]
    assert attrs["QueueArn"] == first["queue_arn"] and ":eu-west-3:" in attrs["QueueArn"]
    assert attrs["MessageRetentionPeriod"] == str(14 * 86400)
    (statement,) = json.loads(attrs["Policy"])["Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Condition"]["ArnEquals"] == {"aws:SourceArn": f"arn:aws:s3:::{BUCKET}"}
    conf = s3.get_bucket_notification_configuration(Bucket=BUCKET)["QueueConfigurations"]
    ids = sorted(c["Id"] for c in conf)
    assert ids == ["fruits-pipeline-new-photos", "someone-elses"]
    (ours,) = [c for c in conf if c["Id"] == "fruits-pipeline-new-photos"]
    assert ours["Events"] == ["s3:ObjectCreated:*"]
    assert ours["Filter"]["Key"]["FilterRules"] == [{"Name": "prefix", "Value": "Test/"}]


def test_uploads_arrive_decoded_and_the_test_event_is_told_apart(s3, capsys):
    url = _setup(capsys)["queue_url"]
    key = "Test/Apple Braeburn/café 1+1% (2).jpg"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"12345")
    s3.put_object(Bucket=BUCKET, Key="Elsewhere/x.jpg", Body=b"1")  # outside the prefix
    queue = EventQueue(url, StoreSettings(region=REGION), visibility=60)
    messages = queue.receive_many(limit=100)
    tests = [m for m in messages if m.test]
    events = [e for m in messages for e in m.events]
    assert len(tests) == 1 and tests[0].events == []
    assert [(e.bucket, e.key, e.size) for e in events] == [(BUCKET, key, 5)]
    assert events[0].uri("s3a") == f"s3a://{BUCKET}/{key}"
    assert events[0].time_ms > 1_600_000_000_000
    queue.delete(m.receipt for m in messages)
    assert queue.receive_many(limit=100) == []
    assert queue.counter.snapshot()["DeleteMessageBatch"] == 1


def test_a_bucket_outside_the_eu_is_refused_in_one_line(aws, capsys):
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="us-photos")
    code = main(["bucket", "notifications", "us-photos", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "outside the EU" in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_queue_name_is_refused(s3, capsys):
    code = main(["bucket", "notifications", BUCKET, "--queue", "no spaces", "--quiet"])
    assert code == 2
    assert "queue name 'no spaces' is not valid" in capsys.readouterr().err


def _record(name: str, key: str, size: int = 3) -> dict:
    return {
        "eventName": name,
        "eventTime": "2026-12-05T10:00:01.250Z",
        "s3": {"bucket": {"name": "b"}, "object": {"key": key, "size": size}},
    }


def test_parse_message_reads_records_sns_envelopes_and_skips_the_rest():
    body = json.dumps(
        {
            "Records": [
                _record("ObjectCreated:Put", "Test/K+iwi/%C3%A9t%C3%A9.jpg"),
                _record("ObjectRemoved:Delete", "Test/gone.jpg"),
                _record("ObjectCreated:CompleteMultipartUpload", "Test/big%2B.jpg", 9),
            ]
        }
    )
    events, test = parse_message(body)
    assert not test
    assert [(e.key, e.size) for e in events] == [("Test/K iwi/été.jpg", 3), ("Test/big+.jpg", 9)]
    assert events[0].time_ms == 1796464801250
    sns = json.dumps({"Type": "Notification", "Message": body})
    assert parse_message(sns)[0] == events
    assert parse_message(json.dumps({"Event": "s3:TestEvent", "Bucket": "b"})) == ([], True)
    assert parse_message("not json") == ([], True)
    assert parse_message(json.dumps({"hello": 1})) == ([], True)
