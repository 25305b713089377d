"""``--queue URL`` on moto's S3 and SQS (one server): the bucket's real notifications
(``bucket notifications``), photos with %-encoded and non-ASCII keys, the test event,
exactly once across a crash before the commit and one after it, and a lost event
caught by the reconciliation (a full ``featurize --incremental``)."""

from __future__ import annotations

import json
from typing import Dict, List

import pytest

from tests import s3_fixtures
from tests.conftest import SAMPLE
from tests.s3_fixtures import REGION

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client
s3a_spark = s3_fixtures.s3a_spark
QUEUED = "queued"
# A space (a '+' in the event), a '+' ('%2B'), a '%' ('%25'), non-ASCII ('%C3%A9').
ODD = ["Test/Apple Braeburn/café 1+1%.jpg", "Test/Kiwi/_DSC0001.JPG"]


@pytest.fixture(scope="module")
def sqs(moto_s3_endpoint):
    import boto3

    return boto3.client("sqs", region_name=REGION)


@pytest.fixture(scope="module")
def queue_url(moto_s3_client, sqs) -> str:
    """The bucket notifying its queue, as `bucket notifications` sets it up; a short
    visibility timeout so a crashed consumer's messages come back within the test."""
    from cluster.notifications import setup_notifications

    moto_s3_client.create_bucket(
        Bucket=QUEUED, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    url = setup_notifications(moto_s3_client, lambda region: sqs, QUEUED, "Test/")["queue_url"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "2"})
    return url


def _photo(i: int) -> bytes:
    return sorted(SAMPLE.glob("*/*.jpg"))[i].read_bytes()


def _upload(client, keys: List[str], start: int = 0) -> None:
    for i, key in enumerate(keys):
        client.put_object(Bucket=QUEUED, Key=key, Body=_photo(start + i))


def _rows(spark, features: str) -> Dict[str, int]:
    """path -> how many rows the table holds for it."""
    from stages.storage.table import FeaturesTable

    table = FeaturesTable(spark, features)
    out: Dict[str, int] = {}
    for (path,) in table.read_runs(table.live_runs()).select("path").collect():
        out[path] = out.get(path, 0) + 1
    return out


def _drain(sqs, url: str) -> None:
    """Delete what the queue holds now (PurgeQueue allows one call a minute)."""
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return
        for m in got:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def _waiting(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def test_queue_run_featurizes_the_announced_photos_once(
    s3a_spark, moto_s3_client, sqs, queue_url, tmp_path
):
    from stages.featurize import featurize

    keys = ["Test/Kiwi/a.jpg", *ODD]
    _upload(moto_s3_client, keys)
    moto_s3_client.put_object(Bucket=QUEUED, Key="Test/Kiwi/notes.txt", Body=b"not a photo")
    features = str(tmp_path / "features")
    report = featurize(
        s3a_spark, f"s3a://{QUEUED}/Test/", features, weights="bundled", incremental=True,
        queue=queue_url,
    )  # fmt: skip
    assert report.test_events == 1  # sent when the notification was configured
    assert (report.images, report.errors, report.outside_input) == (3, 0, 1)
    assert _rows(s3a_spark, features) == {f"s3a://{QUEUED}/{k}": 1 for k in keys}
    assert report.requests["GetObject"] == 3 and "HeadObject" not in report.requests
    assert report.requests["sqs:DeleteMessageBatch"] == 1
    assert _waiting(sqs, queue_url) == 0  # deleted after the commit
    # A message delivered twice (at least once): skipped, deleted, no new run.
    body = {"Records": [{"eventName": "ObjectCreated:Put", "eventTime": "2026-12-05T10:00:00Z",
                         "s3": {"bucket": {"name": QUEUED},
                                "object": {"key": "Test/Kiwi/a.jpg", "size": 1}}}]}  # fmt: skip
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
    again = featurize(s3a_spark, f"s3a://{QUEUED}/Test/", features, incremental=True,
                      weights="bundled", queue=queue_url)  # fmt: skip
    assert (again.run, again.already_featurized, again.images) == (None, 1, 0)
    assert _waiting(sqs, queue_url) == 0


def test_exactly_once_across_crashes_before_and_after_the_commit(
    s3a_spark, moto_s3_client, sqs, queue_url, tmp_path, monkeypatch
):
    from stages.base.params import FeaturizeParams
    from stages.featurize.queue import QueueRun
    from stages.storage.s3events import EventQueue
    from stages.storage.table import FeaturesTable

    features = str(tmp_path / "crashes")
    params = FeaturizeParams.of(None, weights="bundled", incremental=True, queue=queue_url)
    input_path = f"s3a://{QUEUED}/Test/"
    _drain(sqs, queue_url)

    # 1. Dies after writing its rows, before the commit: nothing committed, the
    # messages come back after the visibility timeout.
    first = [f"Test/Crash/{i}.jpg" for i in range(3)]
    _upload(moto_s3_client, first, 10)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(FeaturesTable, "commit", die)
        state = QueueRun(s3a_spark, input_path, features, params, queue_url)
        with pytest.raises(KeyboardInterrupt):
            state.run_once()
        state.close()
    assert _rows(s3a_spark, features) == {}
    # 2. The restart featurizes them (its staging cleared first), then dies after the
    # commit, before deleting the messages: they come back once more.
    with monkeypatch.context() as m:
        m.setattr(EventQueue, "delete", die)
        state = QueueRun(s3a_spark, input_path, features, params, queue_url)
        with pytest.raises(KeyboardInterrupt):
            state.run_once(wait_seconds=10)  # long poll: until the timeout hands them back
        state.close()
    assert _rows(s3a_spark, features) == {f"s3a://{QUEUED}/{k}": 1 for k in first}
    # 3. The next restart finds them in the table: skipped and deleted.
    state = QueueRun(s3a_spark, input_path, features, params, queue_url)
    report = state.run_once(wait_seconds=10)
    state.close()
    assert report.run is None and report.already_featurized == 3
    assert _rows(s3a_spark, features) == {f"s3a://{QUEUED}/{k}": 1 for k in first}
    assert _waiting(sqs, queue_url) == 0


def test_a_lost_event_is_caught_by_the_reconciliation(
    s3a_spark, moto_s3_client, sqs, queue_url, tmp_path
):
    from stages.featurize import featurize

    features = str(tmp_path / "reconciled")
    input_path = f"s3a://{QUEUED}/Lost/"
    _drain(sqs, queue_url)
    # Lost/ is outside the notification's prefix (Test/): its own prefix, so the
    # queue announces one photo and another is uploaded whose event never comes.
    announced, lost = "Lost/Kiwi/announced.jpg", "Lost/Kiwi/lost.jpg"
    _upload(moto_s3_client, [announced, lost], 20)
    body = {"Records": [{"eventName": "ObjectCreated:Put", "eventTime": "2026-12-05T10:00:00Z",
                         "s3": {"bucket": {"name": QUEUED},
                                "object": {"key": announced.replace(" ", "+"),
                                           "size": len(_photo(20))}}}]}  # fmt: skip
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
    by_queue = featurize(s3a_spark, input_path, features, weights="bundled", incremental=True,
                         queue=queue_url)  # fmt: skip
    assert by_queue.images == 1
    assert _rows(s3a_spark, features) == {f"s3a://{QUEUED}/{announced}": 1}
    # The reconciliation lists INPUT: the lost photo is new, the announced one (a row
    # with the event's size and no time) is unchanged, not featurized again.
    full = featurize(s3a_spark, input_path, features, weights="bundled", incremental=True)
    assert (full.new, full.changed, full.images) == (1, 0, 1)
    assert _rows(s3a_spark, features) == {f"s3a://{QUEUED}/{k}": 1 for k in (announced, lost)}
    nothing = featurize(s3a_spark, input_path, features, weights="bundled", incremental=True)
    assert nothing.run is None and nothing.changed == 0


def test_queue_options_are_checked_before_spark(capsys):
    from stages.cli import main

    url = "https://sqs.eu-west-3.amazonaws.com/1/q"
    assert main(["featurize", "in/", "out/", "--queue", url, "--quiet"]) == 2
    assert "--queue adds the announced photos to OUTPUT: give --incremental" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exc:
        main(["featurize", "in/", "out/", "--incremental", "--queue", "not-a-url"])
    assert exc.value.code == 2
    assert "--queue: not-a-url must be an SQS queue URL" in capsys.readouterr().err
    assert main(["watch", "in/", "out/", "--queue", url, "--quiet"]) == 2
    assert "--queue reads S3 notifications: INPUT must be s3:// or s3a://" in (
        capsys.readouterr().err
    )


def test_watch_queue_available_now_takes_what_the_queue_holds(
    s3a_spark, moto_s3_client, sqs, queue_url, tmp_path
):
    from stages.watch import watch

    _drain(sqs, queue_url)
    keys = ["Test/Watched/1.jpg", "Test/Watched/été 2.jpg"]
    _upload(moto_s3_client, keys, 30)
    features = str(tmp_path / "watched")
    result = watch(s3a_spark, f"s3a://{QUEUED}/Test/", features, weights="bundled",
                   queue=queue_url, available_now=True)  # fmt: skip
    assert (result["batches"], result["images"], result["messages"]) == (1, 2, 2)
    assert _rows(s3a_spark, features) == {f"s3a://{QUEUED}/{k}": 1 for k in keys}
    assert _waiting(sqs, queue_url) == 0


def test_watch_queue_cli_ends_and_stops_on_sigterm_after_its_run(
    s3a_spark, moto_s3_client, sqs, queue_url, tmp_path, monkeypatch, capsys
):
    """The command: ``--available-now`` exits 0; SIGTERM (here sent by a thread of this
    process once the run has committed) stops it after that run: one line, exit 143."""
    import os
    import signal
    import threading
    import time

    from stages.cli import main

    monkeypatch.setenv("FRUITS_LOG_DIR", str(tmp_path))
    _drain(sqs, queue_url)
    features = tmp_path / "cli"
    argv = ["watch", f"s3a://{QUEUED}/Test/", str(features), "--weights", "bundled",
            "--queue", queue_url, "--quiet"]  # fmt: skip
    _upload(moto_s3_client, ["Test/Cli/1.jpg"], 40)
    assert main([*argv, "--available-now"]) == 0, capsys.readouterr().err
    _upload(moto_s3_client, ["Test/Cli/2.jpg"], 41)

    def send_once_committed() -> None:
        deadline = time.monotonic() + 120
        while len(list((features / "_runs").glob("*.json"))) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    leaked = []  # SIGTERM reaching this handler: watch did not take it (and goes on)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: leaked.append(signum))
    sender = threading.Thread(target=send_once_committed, daemon=True)
    sender.start()
    try:
        code = main([*argv, "--trigger", "1s", "--stop-after", "150"])
    finally:
        sender.join(150)
        signal.signal(signal.SIGTERM, previous)
    lines = capsys.readouterr().err.strip().splitlines()
    assert (code, lines, leaked) == (
        143, ["fruits-pipeline: stopped; 1 photos featurized since start"], []
    )  # fmt: skip
    assert _rows(s3a_spark, str(features)) == {
        f"s3a://{QUEUED}/Test/Cli/{n}.jpg": 1 for n in (1, 2)
    }
