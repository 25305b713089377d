"""``watch``: a Structured Streaming query killed and restarted gives one row per image."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.featurize.incremental import featurize_incremental
from stages.reduce import reduce_features
from stages.reduce.pca_model import PCAModel
from stages.storage.table import FeaturesTable
from stages.watch import WatchParams, watch
from tests.conftest import ROOT, SAMPLE

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

FILES = sorted(SAMPLE.glob("*/*.jpg"))


def _land(files, dest: Path) -> None:
    """Copy images in as an uploader would: written aside, then renamed into place.

    Each file is complete when it appears, so it is dated a minute back: watch sets aside
    what was modified in the last SETTLE_SECONDS (a file maybe still being written; tested
    in test_watch_stops.py), and these tests are about batches, kills and restarts, whose
    timing must not depend on how long the JVM took to start."""
    for f in files:
        (dest / f.parent.name).mkdir(parents=True, exist_ok=True)
        tmp = dest / f.parent.name / f".{f.name}.part"
        shutil.copyfile(f, tmp)
        past = time.time() - 60
        os.utime(tmp, (past, past))
        tmp.rename(dest / f.parent.name / f.name)


def test_watch_killed_and_restarted_gives_one_row_per_image(spark, tmp_path):
    bucket, features, results = tmp_path / "Test", tmp_path / "Features", tmp_path / "Results"
    _land(FILES[:10], bucket)
    featurize_incremental(spark, str(bucket), str(features), weights="bundled")
    reduce_features(spark, str(features), str(results), k=3)
    _land(FILES[10:20], bucket)

    env = dict(os.environ, PYTHONPATH=str(ROOT), FRUITS_DRIVER_MEMORY="1g")
    cmd = [sys.executable, "-m", "stages.cli", "watch", str(bucket), str(features)]
    cmd += ["--weights", "bundled", "--trigger", "1s", "--max-files-per-trigger", "4"]
    cmd += ["--results", str(results), "--master", "local[1]", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    table = FeaturesTable(spark, str(features))
    try:
        deadline = time.monotonic() + 240
        while sum(r["kind"] == "watch" for r in table.records()) < 1:
            assert proc.poll() is None, "watch ended on its own"
            assert time.monotonic() < deadline, "watch committed nothing in 4 minutes"
            time.sleep(0.2)
        _land(FILES[20:30], bucket)  # lands while it runs
        time.sleep(1.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # wherever it is: mid-batch, mid-commit
        proc.wait()
    _land(FILES[30:35], bucket)

    opts = WatchParams(weights="bundled", available_now=True, results=str(results))
    report = watch(spark, str(bucket), str(features), opts)
    assert report["batches"] >= 1

    t = pq.read_table(features).to_pydict()
    names = ["/".join(p.split("/")[-2:]) for p in t["path"]]
    assert sorted(names) == sorted(f"{f.parent.name}/{f.name}" for f in FILES[:35])
    records = table.records()
    batches = [(r["query"], r["batch"]) for r in records if r["kind"] == "watch"]
    assert len(batches) == len(set(batches)) and len({q for q, _ in batches}) == 1
    # Every image has exactly one projection, equal to the saved model's transform.
    proj = pq.read_table(results / "projections").to_pydict()
    assert sorted(proj["path"]) == sorted(t["path"])
    model = PCAModel.load(str(results))
    feats = dict(zip(t["path"], t["features"]))
    for p, v in zip(proj["path"], proj["pca"]):
        want = model.transform(np.asarray([feats[p]], dtype=np.float32))[0]
        np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # A restart with nothing new commits nothing.
    again = watch(spark, str(bucket), str(features), opts)
    assert again["images"] == 0 and len(table.records()) == len(records)
