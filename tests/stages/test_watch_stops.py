"""``watch`` and the photo still being written, Ctrl-C and SIGTERM (on a folder and on S3)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from stages.watch import WatchParams, _Sink, watch
from tests import s3_fixtures
from tests.conftest import ROOT, SAMPLE

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

FILES = sorted(SAMPLE.glob("*/*.jpg"))

# moto's S3 server (module-scoped): the S3 tests' fixtures, made this module's own.
moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client


def _rows(features) -> dict:
    t = pq.read_table(features, columns=["path", "error"]).to_pydict()
    out: dict = {}
    for p, e in zip(t["path"], t["error"]):
        out.setdefault("/".join(p.split("/")[-2:]), []).append(e)
    return out


def test_a_photo_still_being_written_ends_with_its_good_row(spark, tmp_path, monkeypatch):
    """A slow copy: 30 % of the bytes, then 4 bytes every 0.5 s while watch lists and runs
    its batch, the rest once that batch is over."""
    import threading

    bucket, features = tmp_path / "Test", tmp_path / "Features"
    for f in FILES[:2]:
        (bucket / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, bucket / f.parent.name / f.name)
    photo = FILES[5]
    data = photo.read_bytes()
    dest = bucket / photo.parent.name / photo.name
    dest.write_bytes(data[: len(data) * 3 // 10])
    batch_over = threading.Event()

    def copy_slowly() -> None:
        at = len(data) * 3 // 10
        with open(dest, "ab", buffering=0) as fh:
            while not batch_over.wait(0.5) and at < len(data) - 4:
                fh.write(data[at : at + 4])
                at += 4
            batch_over.wait(120)
            fh.write(data[at:])

    original = _Sink.__call__

    def batch(self, batch_df, batch_id):
        try:
            original(self, batch_df, batch_id)
        finally:
            batch_over.set()

    writer = threading.Thread(target=copy_slowly, daemon=True)
    writer.start()
    monkeypatch.setattr(_Sink, "__call__", batch)
    opts = WatchParams(weights="bundled", available_now=True)
    try:
        watch(spark, str(bucket), str(features), opts)
    finally:
        batch_over.set()
        writer.join(30)
    monkeypatch.setattr(_Sink, "__call__", original)
    assert dest.read_bytes() == data
    rows = _rows(features)
    assert rows == {f"{f.parent.name}/{f.name}": [None] for f in (*FILES[:2], photo)}, rows
    again = watch(spark, str(bucket), str(features), opts)
    assert again["images"] == 0 and again["pending"] == 0


SIGNALS = pytest.mark.parametrize(
    ("sig", "code", "whole_group"),
    [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
    ids=["ctrl-c", "sigterm"],
)


def _signal_once_committed(args, env, committed, sig, whole_group):
    """Run ``fruits-pipeline watch ARGS`` until ``committed()``, then send ``sig`` (to the
    whole process group, or to the process); its exit code, stderr lines and stdout.

    Ctrl-C reaches the whole foreground process group (the JVM ignores it: pyspark starts
    it so); a service manager's SIGTERM reaches the process."""
    cmd = [sys.executable, "-m", "stages.cli", "watch", *args]
    cmd += ["--weights", "bundled", "--trigger", "1s", "--master", "local[1]", "--quiet"]
    env = dict(env, PYTHONPATH=str(ROOT), FRUITS_DRIVER_MEMORY="1g")
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while not committed():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "watch committed nothing in 4 minutes"
            time.sleep(0.2)
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err.decode().strip().splitlines(), out


@SIGNALS
def test_a_signal_stops_watch_after_its_batch_with_one_line(tmp_path, sig, code, whole_group):
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    for f in FILES[:3]:
        (bucket / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, bucket / f.parent.name / f.name)  # old times: settled

    def committed() -> bool:
        return (features / "_runs").is_dir() and any((features / "_runs").glob("*.json"))

    args = [str(bucket), str(features)]
    rc, lines, out = _signal_once_committed(args, os.environ, committed, sig, whole_group)
    assert rc == code, lines
    assert lines == ["fruits-pipeline: stopped; 3 photos featurized since start"], lines
    assert out == b""
    assert sorted(_rows(features)) == sorted(f"{f.parent.name}/{f.name}" for f in FILES[:3])


@SIGNALS
def test_a_signal_stops_watch_on_s3_after_its_run_with_one_line(
    moto_s3_endpoint, moto_s3_client, tmp_path, sig, code, whole_group
):
    """``watch`` on S3 without a queue (a ``featurize --incremental`` run each trigger):
    the same stop, through S3A on moto's server."""
    from tests.s3_fixtures import (
        BUCKET,
        REGION,
        list_keys,
        read_parquet_from_bucket,
        require_s3a_jars,
    )

    require_s3a_jars()
    prefix = f"Stops{code}"
    if BUCKET not in [b["Name"] for b in moto_s3_client.list_buckets()["Buckets"]]:
        moto_s3_client.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
    for f in FILES[:3]:
        moto_s3_client.upload_file(str(f), BUCKET, f"{prefix}/Test/{f.parent.name}/{f.name}")

    def committed() -> bool:
        return bool(list_keys(moto_s3_client, f"{prefix}/Features/_runs/"))

    args = [f"s3a://{BUCKET}/{prefix}/Test/", f"s3a://{BUCKET}/{prefix}/Features/"]
    env = dict(os.environ, FRUITS_LOG_DIR=str(tmp_path))
    rc, lines, out = _signal_once_committed(args, env, committed, sig, whole_group)
    assert rc == code, lines
    assert lines == ["fruits-pipeline: stopped; 3 photos featurized since start"], lines
    assert out == b""
    table = read_parquet_from_bucket(moto_s3_client, f"{prefix}/Features/run=")
    paths = ["/".join(p.split("/")[-2:]) for p in table.column("path").to_pylist()]
    assert sorted(paths) == sorted(f"{f.parent.name}/{f.name}" for f in FILES[:3])
