"""``featurize --incremental``: only what is new, one atomic run each, one row per image."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stages.base.errors import UsageError
from stages.featurize.incremental import featurize_incremental
from stages.storage.table import FeaturesTable
from tests.conftest import ROOT, SAMPLE, copy_images

pytestmark = pytest.mark.slow

SAMPLE_FILES = sorted(SAMPLE.glob("*/*.jpg"))


def rows_by_image(features: Path) -> dict:
    """{"Class/file.jpg": [(features or None, error, run), ...]} read by pyarrow."""
    t = pq.read_table(features).to_pydict()
    out: dict = {}
    for p, f, e, r in zip(t["path"], t["features"], t["error"], t["run"]):
        key = "/".join(p.split("/")[-2:])
        out.setdefault(key, []).append((None if f is None else np.asarray(f, np.float32), e, r))
    return out


def one_row_each(features: Path, expected: set) -> dict:
    rows = rows_by_image(features)
    assert set(rows) == expected
    assert all(len(v) == 1 for v in rows.values()), {k: len(v) for k, v in rows.items()}
    return {k: v[0] for k, v in rows.items()}


def data_files(features: Path) -> dict:
    return {
        str(p.relative_to(features)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in features.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def grown(spark, tmp_path_factory):
    """A bucket of 30 images featurized incrementally, then 20 more, step by step."""
    root = tmp_path_factory.mktemp("grow")
    bucket, features = root / "Test", root / "Features"
    copy_images(SAMPLE_FILES[:30], bucket)
    steps = {"first": featurize_incremental(spark, str(bucket), str(features))}
    steps["files_after_first"] = data_files(features)
    steps["again"] = featurize_incremental(spark, str(bucket), str(features))
    steps["files_after_again"] = data_files(features)
    copy_images(SAMPLE_FILES[30:50], bucket)
    steps["plus20"] = featurize_incremental(spark, str(bucket), str(features))
    return bucket, features, steps


def test_first_run_then_nothing_new_changes_nothing(grown):
    _, features, steps = grown
    first, again = steps["first"], steps["again"]
    assert (first.new, first.images, first.errors) == (30, 30, 0)
    assert again.run is None and again.images == 0 and again.new == 0 and again.listed == 30
    assert steps["files_after_again"] == steps["files_after_first"]


def test_adding_20_images_featurizes_exactly_20(spark, grown, sample_features):
    _, features, steps = grown
    plus = steps["plus20"]
    assert (plus.new, plus.changed, plus.images, plus.carried) == (20, 0, 20, 0)
    rows = one_row_each(features, {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[:50]})
    runs = {r for _, _, r in rows.values()}
    assert runs == {steps["first"].run, plus.run}
    # The same code path as a plain featurize: the same features, image by image.
    plain = {
        "/".join(p.split("/")[-2:]): np.asarray(f, np.float32)
        for p, f in zip(*pq.read_table(sample_features, columns=["path", "features"]).columns)
        for p, f in [(p.as_py(), f.as_py())]
    }
    assert max(np.abs(v[0] - plain[k]).max() for k, v in rows.items()) == 0.0
    # Spark sees the same one table, with the run that wrote each row.
    df = spark.read.parquet(str(features))
    assert df.count() == 50 and df.select("path").distinct().count() == 50
    assert {r[0] for r in df.select("run").distinct().collect()} == runs
    table = FeaturesTable(spark, str(features))
    assert [r["run"] for r in table.records()] == sorted(runs)
    assert len(pd.read_parquet(features, columns=["path"]).drop_duplicates()) == 50
    # And so does DuckDB, through the hive-style run folders.
    import duckdb  # a test dependency (pyproject's [test] extra)

    glob = str(features / "run=*" / "*.parquet")
    n, paths, n_runs = duckdb.sql(
        f"select count(*), count(distinct path), count(distinct run) "
        f"from read_parquet('{glob}', hive_partitioning = true)"
    ).fetchone()
    assert (n, paths, n_runs) == (50, 50, 2)


def test_replaced_image_is_featurized_again_and_pruned_rows_go(spark, grown):
    bucket, features, steps = grown
    # Replace one image by another photo: new bytes, new size.
    target, donor = SAMPLE_FILES[0], SAMPLE_FILES[60]
    dest = bucket / target.parent.name / target.name
    shutil.copyfile(donor, dest)
    os.utime(dest, (time.time() + 5, time.time() + 5))
    gone = [bucket / f.parent.name / f.name for f in SAMPLE_FILES[40:42]]
    for g in gone:
        g.unlink()
    report = featurize_incremental(spark, str(bucket), str(features), prune=True)
    assert (report.new, report.changed, report.pruned, report.images) == (0, 1, 2, 1)
    assert steps["first"].run in report.superseded
    keep = {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[:50]} - {
        f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[40:42]
    }
    rows = one_row_each(features, keep)
    # The replaced image's row now holds the donor's features (both made by this model).
    copy_images([donor], bucket.parent / "DonorIn")
    solo = featurize_incremental(
        spark, str(bucket.parent / "DonorIn"), str(bucket.parent / "Donor")
    )
    assert solo.images == 1
    donor_row = one_row_each(bucket.parent / "Donor", {f"{donor.parent.name}/{donor.name}"})
    key = f"{target.parent.name}/{target.name}"
    assert np.array_equal(rows[key][0], donor_row[f"{donor.parent.name}/{donor.name}"][0])
    assert not (features / f"run={steps['first'].run}").exists()


def test_features_of_another_model_are_refused(spark, grown):
    bucket, features, _ = grown
    before = data_files(features)
    with pytest.raises(UsageError, match="was made by .* not by alpha=0.35 random:1"):
        featurize_incremental(spark, str(bucket), str(features), weights="random:1", alpha=0.35)
    assert data_files(features) == before


def test_a_plain_featurize_output_becomes_the_first_run(spark, sample_features, tmp_path):
    features = tmp_path / "Features"
    shutil.copytree(sample_features, features)
    report = featurize_incremental(spark, str(SAMPLE), str(features))
    # Every image is older than the copied Parquet: nothing to featurize again.
    assert report.run is None and report.listed == 100 and report.images == 0
    rows = one_row_each(features, {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES})
    (run,) = {r for _, _, r in rows.values()}
    assert [r["kind"] for r in FeaturesTable(spark, str(features)).records()] == ["migrate"]
    assert not any(p.suffix == ".parquet" for p in features.iterdir())


def test_a_commit_interrupted_after_its_record_is_rolled_forward(spark, tmp_path):
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(SAMPLE_FILES[:6], bucket)
    first = featurize_incremental(spark, str(bucket), str(features), weights="bundled")
    table = FeaturesTable(spark, str(features))
    # As if the run had died right after its record: rows still in staging.
    final = features / f"run={first.run}"
    staged = features / "_staging" / f"run={first.run}"
    staged.parent.mkdir(exist_ok=True)
    final.rename(staged)
    copy_images(SAMPLE_FILES[6:8], bucket)
    report = featurize_incremental(spark, str(bucket), str(features), weights="bundled")
    assert report.new == 2 and not staged.exists() and final.exists()
    one_row_each(features, {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[:8]})
    assert len(table.records()) == 2


@pytest.mark.cluster
def test_a_run_killed_mid_write_then_rerun_gives_one_row_per_image(spark, tmp_path):
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(SAMPLE_FILES[:10], bucket)
    featurize_incremental(spark, str(bucket), str(features), weights="bundled")
    copy_images(SAMPLE_FILES[10:40], bucket)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FRUITS_DRIVER_MEMORY="1g")
    cmd = [sys.executable, "-m", "stages.cli", "featurize", str(bucket), str(features)]
    cmd += ["--incremental", "--weights", "bundled", "--master", "local[1]", "--quiet"]
    cmd += ["--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    staging = features / "_staging"
    deadline = time.monotonic() + 240
    try:
        # Kill it while Spark writes the run: its task output exists, the run has no record.
        while not list(staging.glob("run=*/_temporary/*/*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        assert list(staging.glob("run=*")), "the run never started writing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(FeaturesTable(spark, str(features)).records()) == 1
    one_row_each(features, {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[:10]})
    report = featurize_incremental(spark, str(bucket), str(features), weights="bundled")
    assert report.new == 30 and report.images == 30
    assert not list(staging.glob("run=*"))
    one_row_each(features, {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[:40]})


def test_zero_byte_and_corrupt_files_become_error_rows_once(spark, tmp_path):
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(SAMPLE_FILES[:3], bucket)
    (bucket / "Kiwi").mkdir(exist_ok=True)
    (bucket / "Kiwi" / "empty.jpg").write_bytes(b"")
    (bucket / "Kiwi" / "text.jpg").write_bytes(b"not a jpeg")
    first = featurize_incremental(spark, str(bucket), str(features))
    assert (first.new, first.images, first.errors) == (5, 5, 2)
    rows = one_row_each(
        features,
        {f"{f.parent.name}/{f.name}" for f in SAMPLE_FILES[:3]}
        | {"Kiwi/empty.jpg", "Kiwi/text.jpg"},
    )
    assert rows["Kiwi/empty.jpg"][1] == "empty file (0 bytes)" and rows["Kiwi/empty.jpg"][0] is None
    assert rows["Kiwi/text.jpg"][1] and rows["Kiwi/text.jpg"][0] is None
    again = featurize_incremental(spark, str(bucket), str(features))
    assert again.run is None and again.listed == 5


def test_decode_options_reach_an_incremental_run_and_stay_its_model(spark, tmp_path):
    from stages.base.params import FeaturizeParams
    from stages.featurize import featurize
    from stages.featurize.incremental import IncrementalReport

    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(SAMPLE_FILES[:2], bucket)
    params = FeaturizeParams(incremental=True, exif_orientation=False, jpeg_draft=2)
    first = featurize(spark, str(bucket), str(features), params)  # the CLI's one entry point
    assert isinstance(first, IncrementalReport) and (first.new, first.errors) == (2, 0)
    model = FeaturesTable(spark, str(features)).model()
    assert (model["exif_orientation"], model["jpeg_draft"]) == (False, 2)
    copy_images(SAMPLE_FILES[2:3], bucket)
    before = data_files(features)
    made = r"bundled:\S+ --ignore-exif-orientation --jpeg-draft 2, not by alpha=0.35 bundled:\S+: "
    with pytest.raises(UsageError, match=made):  # a full decode with EXIF is another model
        featurize_incremental(spark, str(bucket), str(features))
    assert data_files(features) == before
