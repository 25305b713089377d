"""Two writers on one FEATURES never both commit the same photos, and rows carried over from
a plain featurize output are not featurized again by every later run."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pyarrow.parquet as pq
import pytest

from stages.base.errors import UsageError
from stages.featurize.incremental import featurize_incremental
from stages.storage.table import FeaturesTable
from tests import s3_fixtures
from tests.conftest import SAMPLE, copy_images

pytestmark = pytest.mark.slow

FILES = sorted(SAMPLE.glob("*/*.jpg"))

moto_s3_endpoint = s3_fixtures.moto_s3_endpoint
moto_s3_client = s3_fixtures.moto_s3_client


def _paths(features) -> list:
    return sorted(pq.read_table(features, columns=["path"]).column("path").to_pylist())


def _at_once(monkeypatch, *calls):
    """Run ``calls`` in threads that each plan before any of them commits (a barrier at the
    commit): the worst interleaving of two writers, every time."""
    barrier = threading.Barrier(len(calls), timeout=300)
    original = FeaturesTable.commit

    def commit(self, *args, **kwargs):
        barrier.wait()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeaturesTable, "commit", commit)
    out: list = [None] * len(calls)

    def run(i, call):
        try:
            out[i] = call()
        except Exception as exc:  # what the writer's user would see
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    monkeypatch.setattr(FeaturesTable, "commit", original)
    return out


def test_two_runs_on_the_same_new_photos_never_both_commit(spark, tmp_path, monkeypatch):
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(FILES[:6], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    copy_images(FILES[6:12], bucket)

    def writer():
        return featurize_incremental(spark, str(bucket), str(features))

    out = _at_once(monkeypatch, writer, writer)
    refused = [r for r in out if isinstance(r, Exception)]
    assert len(refused) == 1, out
    assert isinstance(refused[0], UsageError), refused[0]
    assert "another run committed to" in str(refused[0]) and "run again" in str(refused[0])
    paths = _paths(features)
    assert len(paths) == len(set(paths)) == 12
    assert not list((features / "_staging").glob("run=*"))  # the loser cleaned up
    again = featurize_incremental(spark, str(bucket), str(features))
    assert again.run is None and again.new == 0


def test_the_loser_of_two_migrations_of_a_plain_output_is_one_line(
    spark, sample_features, tmp_path, monkeypatch
):
    """Two writers on a plain featurize output: one moves its files into a first run while
    the other, which listed them before, reads them (it failed with `Py4JJavaError ...
    o154.count`)."""
    features = tmp_path / "Features"
    shutil.copytree(sample_features, features)
    loser = FeaturesTable(spark, str(features))
    listed = loser.flat_files()
    assert FeaturesTable(spark, str(features)).migrate_flat() is not None  # the winner
    monkeypatch.setattr(loser, "flat_files", lambda: listed)
    with pytest.raises(UsageError, match="another run moved the files of .* run again"):
        loser.migrate_flat()
    assert len(_paths(features)) == 100
    assert len(FeaturesTable(spark, str(features)).records()) == 1


def test_two_runs_on_different_photos_both_commit(spark, tmp_path, monkeypatch):
    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(FILES[:4], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    a, b = tmp_path / "A", tmp_path / "B"
    copy_images(FILES[40:44], a)
    copy_images(FILES[60:64], b)
    out = _at_once(
        monkeypatch,
        lambda: featurize_incremental(spark, str(a), str(features)),
        lambda: featurize_incremental(spark, str(b), str(features)),
    )
    assert all(r.new == 4 for r in out), out
    paths = _paths(features)
    assert len(paths) == len(set(paths)) == 12
    assert len(FeaturesTable(spark, str(features)).records()) == 3


def test_rows_carried_from_a_plain_featurize_are_not_featurized_again(spark, tmp_path):
    from stages.featurize import featurize

    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(FILES[:20], bucket)
    featurize(spark, str(bucket), str(features))  # a plain output, then grown
    # One photo replaced: its run (the plain output's files) is rewritten, 19 rows carried.
    target = bucket / FILES[0].parent.name / FILES[0].name
    shutil.copyfile(FILES[70], target)
    os.utime(target, (time.time() + 5, time.time() + 5))
    first = featurize_incremental(spark, str(bucket), str(features))
    assert (first.changed, first.carried) == (1, 19), first
    before = sorted(p.name for p in features.rglob("*.parquet"))
    again = featurize_incremental(spark, str(bucket), str(features))
    assert (again.run, again.new, again.changed, again.images) == (None, 0, 0, 0), again
    assert sorted(p.name for p in features.rglob("*.parquet")) == before


def _race(create, uris):
    """``create(uri, text)`` from 8 threads at once for each uri: who won each."""
    winners = {}
    for uri in uris:
        barrier = threading.Barrier(8)
        got: list = [None] * 8

        def one(i, uri=uri, barrier=barrier, got=got):
            barrier.wait()
            got[i] = create(uri, f"writer {i}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got.count(True) == 1 and got.count(False) == 7, got
        winners[uri] = got.index(True)
    return winners


def test_the_commit_point_is_created_once_on_a_local_disk(tmp_path):
    from stages.storage.claim import create_exclusive

    uris = [str(tmp_path / "_runs" / f"{n:08d}.json") for n in range(1, 6)]
    winners = _race(lambda u, t: create_exclusive(None, u, t), uris)
    for uri, i in winners.items():
        assert open(uri).read() == f"writer {i}"  # the winner's whole text, never replaced
    assert sorted(p.name for p in (tmp_path / "_runs").iterdir()) == [
        f"{n:08d}.json" for n in range(1, 6)
    ]  # no temporary file left


def test_the_commit_point_is_created_once_on_s3(moto_s3_client):
    from stages.storage.claim import create_exclusive

    moto_s3_client.create_bucket(
        Bucket="claims", CreateBucketConfiguration={"LocationConstraint": s3_fixtures.REGION}
    )
    uris = [f"s3a://claims/F/_runs/{n:08d}.json" for n in range(1, 6)]
    winners = _race(lambda u, t: create_exclusive(None, u, t), uris)
    for uri, i in winners.items():
        body = moto_s3_client.get_object(Bucket="claims", Key=uri.split("/", 3)[3])["Body"]
        assert body.read().decode() == f"writer {i}"


def test_watch_and_an_incremental_run_on_the_same_photos_never_both_commit(
    spark, tmp_path, monkeypatch
):
    """``featurize --incremental`` commits the photos of watch's batch while that batch is
    being featurized (and takes watch's staging folder for a killed run's): watch's commit
    is refused (one line), every photo has one row, no record without its rows."""
    from stages.watch import WatchParams, watch

    bucket, features = tmp_path / "Test", tmp_path / "Features"
    copy_images(FILES[:3], bucket)  # times kept: settled
    featurize_incremental(spark, str(bucket), str(features))
    copy_images(FILES[20:24], bucket)
    original = FeaturesTable.commit
    other: list = []

    def commit(self, record, base=None):
        kind = record.kind if hasattr(record, "kind") else record.get("kind")
        if kind == "watch" and not other:
            other.append(featurize_incremental(spark, str(bucket), str(features)))
        return original(self, record, base)

    monkeypatch.setattr(FeaturesTable, "commit", commit)
    with pytest.raises(UsageError, match="another run .* run again"):
        watch(spark, str(bucket), str(features), WatchParams(available_now=True))
    monkeypatch.setattr(FeaturesTable, "commit", original)
    assert other[0].new == 4
    paths = _paths(features)
    assert len(paths) == len(set(paths)) == 7
    table = FeaturesTable(spark, str(features))
    assert [r["kind"] for r in table.records()] == ["featurize", "featurize"]
