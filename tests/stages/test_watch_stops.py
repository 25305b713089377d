"""``watch`` and the photo still being written, Ctrl-C and SIGTERM."""

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
from tests.conftest import ROOT, SAMPLE

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

FILES = sorted(SAMPLE.glob("*/*.jpg"))


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


@pytest.mark.parametrize(
    ("sig", "code", "whole_group"),
    [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_stops_watch_after_its_batch_with_one_line(tmp_path, sig, code, whole_group):
    """Ctrl-C reaches the whole foreground process group (the JVM ignores it: pyspark starts
    it so); a service manager's SIGTERM reaches the process."""
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    for f in FILES[:3]:
        (bucket / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, bucket / f.parent.name / f.name)  # old times: settled
    env = dict(os.environ, PYTHONPATH=str(ROOT), FRUITS_DRIVER_MEMORY="1g")
    cmd = [sys.executable, "-m", "stages.cli", "watch", str(bucket), str(features)]
    cmd += ["--weights", "bundled", "--trigger", "1s", "--master", "local[1]", "--quiet"]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while not (features / "_runs").is_dir() or not any((features / "_runs").glob("*.json")):
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
    lines = err.decode().strip().splitlines()
    assert proc.returncode == code, lines
    assert lines == ["fruits-pipeline: stopped; 3 photos featurized since start"], lines
    assert out == b""
    assert sorted(_rows(features)) == sorted(f"{f.parent.name}/{f.name}" for f in FILES[:3])
