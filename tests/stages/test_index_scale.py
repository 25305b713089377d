"""The search index built from the features alone: thumbnails made by featurize (the
photos may be gone), shards written by the executors (byte-identical whatever the chunk),
rows added by ``reduce --update`` and ``watch --results``, and a failed index step that
keeps the PCA's work."""

from __future__ import annotations

import filecmp
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.base.errors import UsageError
from stages.cli import main
from stages.featurize import featurize
from stages.featurize.incremental import featurize_incremental
from stages.reduce import index as reduce_index
from stages.reduce import reduce_features
from stages.reduce.index import build_index
from stages.reduce.update import update_reduce
from stages.search.query import QueryEngine, SearchIndex
from stages.watch import WatchParams, watch
from tests.conftest import SAMPLE, copy_images

pytestmark = pytest.mark.slow

FILES = sorted(SAMPLE.glob("*/*.jpg"))


def _top(engine: QueryEngine, photo: Path) -> dict:
    return engine.similar_bytes(photo.read_bytes(), top=3)["matches"][0]


@pytest.fixture(scope="module")
def gone(spark, tmp_path_factory):
    """Features of 30 photos that were deleted after featurize, and their RESULTS."""
    root = tmp_path_factory.mktemp("gone")
    copy_images(FILES[:30], root / "Bucket")
    featurize(spark, str(root / "Bucket"), str(root / "Features"), weights="bundled")
    shutil.rmtree(root / "Bucket")
    reduce_features(spark, str(root / "Features"), str(root / "Results"), k=5)
    return root


def test_an_index_of_deleted_photos_has_their_thumbnails(gone):
    meta = json.loads((gone / "Results" / "index" / "index.json").read_text())
    assert meta["rows"] == 30 and meta["thumbnails"]["missing"] == 0
    features = pq.read_table(gone / "Features", columns=["path", "thumb"]).to_pydict()
    made = dict(zip(features["path"], features["thumb"]))
    index = SearchIndex(str(gone / "Results"))
    for i in range(len(index)):
        thumb = index.thumbnail(i)
        assert thumb[:3] == b"\xff\xd8\xff" and thumb == made[index.path(i)]
    match = _top(QueryEngine(str(gone / "Results")), FILES[7])
    assert match["path"].endswith(f"/{FILES[7].parent.name}/{FILES[7].name}")
    assert match["distance"] < 1e-3 and match["thumbnail"].startswith("data:image/jpeg;base64,")


def test_the_chunked_writer_writes_the_same_bytes_as_one_chunk(spark, gone, tmp_path):
    for name, chunk in (("One", 1_000_000), ("Small", 3)):
        shutil.copytree(gone / "Results", tmp_path / name, ignore=shutil.ignore_patterns("index"))
        build_index(spark, str(tmp_path / name), chunk_rows=chunk)
    one, small = tmp_path / "One" / "index", tmp_path / "Small" / "index"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    assert any(f.name == "thumbs.bin" for f in files) and Path("index.json") in files
    different = [f for f in files if not filecmp.cmp(one / f, small / f, shallow=False)]
    assert different == []


def test_the_open_set_rule_does_not_depend_on_the_partitioning(spark, gone, tmp_path):
    """The same projections as one file and as three files of the rows reversed: Spark's
    partitions put the rows in the shards in other orders, the open-set rule (reference
    rows, held-out split, threshold, rates) stays the same."""
    table = pq.read_table(gone / "Results" / "projections").sort_by("path")
    n = table.num_rows
    backwards = table.take(pa.array(range(n - 1, -1, -1)))
    layouts = {"One": [table], "Three": [backwards.slice(i, 10) for i in range(0, n, 10)]}
    metas, orders = {}, {}
    for name, parts in layouts.items():
        results = tmp_path / name
        shutil.copytree(
            gone / "Results", results, ignore=shutil.ignore_patterns("index", "projections")
        )
        (results / "projections").mkdir()
        for i, part in enumerate(parts):
            pq.write_table(part, results / "projections" / f"part-{i:05d}.parquet")
        (results / "projections" / "_SUCCESS").touch()
        metas[name] = build_index(spark, str(results))
        index = SearchIndex(str(results))
        orders[name] = [index.path(i) for i in range(len(index))]
    assert len(metas["Three"]["shards"]) > 1 and len(metas["One"]["shards"]) == 1
    assert orders["One"] != orders["Three"] and sorted(orders["One"]) == sorted(orders["Three"])
    rules = [dict(m["open_set"]) for m in metas.values()]
    for rule in rules:
        rule.pop("calibration_s")  # seconds: not in index.json
    assert rules[0]["calibrated"] and rules[0]["reference"]["rows"] == n
    assert rules[1] == rules[0]


def test_an_index_of_format_4_is_refused_and_an_append_rebuilds_it(spark, gone, tmp_path):
    """Format 4 had no keys.npy (the open-set rows followed the row order): the app refuses
    it with the command that rebuilds it, and ``watch --results`` rebuilds it."""
    from stages.reduce.index_append import append_index

    results = tmp_path / "Results"
    shutil.copytree(gone / "Results", results)
    meta_path = results / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == reduce_index.FORMAT == 5
    meta["format"] = 4
    meta_path.write_text(json.dumps(meta))
    for keys in (results / "index" / "shards").glob("*/keys.npy"):
        keys.unlink()
    with pytest.raises(UsageError, match="another format: run `fruits-pipeline index`"):
        SearchIndex(str(results))
    rebuilt = append_index(spark, str(results), str(results / "projections"))
    assert rebuilt["format"] == 5 and rebuilt["generation"] == 1 and rebuilt["rows"] == 30
    assert SearchIndex(str(results)).open_set.rule == meta["open_set"]


def _failing_finish(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_failed_index_step_keeps_the_projections_and_the_model(
    gone, tmp_path, monkeypatch, capsys
):
    results = tmp_path / "Results"
    monkeypatch.setattr(reduce_index, "finish_meta", _failing_finish)
    assert main(["reduce", str(gone / "Features"), str(results), "--k", "5", "--quiet"]) == 1
    # One error line (the progress lines of the Spark jobs before it are not errors).
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("fruits-pipeline: error: the index step failed ")
    assert "no space left" in err[0].lower()
    assert (
        f"committed in {results}: build the index with `fruits-pipeline index {results}`" in err[0]
    )
    assert (results / "projections" / "_SUCCESS").exists()
    assert (results / "pca_model" / "arrays.npz").exists() and (results / "summary.json").exists()
    assert not (results / "index").exists()
    monkeypatch.undo()
    assert main(["index", str(results), "--quiet"]) == 0
    assert SearchIndex(str(results)).meta["rows"] == 30


def test_paths_of_an_unknown_scheme_get_no_thumbnail_and_a_count(spark, gone, tmp_path, caplog):
    """``syn://`` paths (and old features without thumbnails) never fail the run: the
    index opens no photo."""
    out = tmp_path / "Features"
    out.mkdir()
    for i, part in enumerate(sorted((gone / "Features").glob("*.parquet"))):
        table = pq.read_table(part)
        n = table.num_rows
        paths = [
            f"syn://{i}-{j}.jpg" if j < 3 else p for j, p in enumerate(table["path"].to_pylist())
        ]
        thumbs = [None if j < 3 else t for j, t in enumerate(table["thumb"].to_pylist())]
        table = table.set_column(0, table.schema.field("path"), pa.array(paths, pa.string()))
        col = table.schema.get_field_index("thumb")
        table = table.set_column(col, table.schema.field("thumb"), pa.array(thumbs, pa.binary()))
        assert n > 3
        pq.write_table(table, out / part.name)
    (out / "_SUCCESS").touch()
    caplog.set_level(logging.WARNING, logger="stages.reduce.index")
    summary = reduce_features(spark, str(out), str(tmp_path / "Results"), k=5)
    missing = summary["index"]["thumbnails"]["missing"]
    assert missing == 3 * len(list(out.glob("*.parquet")))
    assert f"index: {missing} of 30 rows have no thumbnail" in caplog.text
    index = SearchIndex(str(tmp_path / "Results"))
    syn = [i for i in range(len(index)) if index.path(i).startswith("syn://")]
    assert len(syn) == missing and all(index.thumbnail(i) is None for i in syn)


def test_reduce_update_makes_the_new_rows_findable(spark, tmp_path):
    bucket, features, results = tmp_path / "Bucket", tmp_path / "Features", tmp_path / "Results"
    copy_images(FILES[:30], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    reduce_features(spark, str(features), str(results), k=5)
    engine = QueryEngine(str(results))  # as a running serve holds it
    copy_images(FILES[60:70], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    summary = update_reduce(spark, str(features), str(results))
    assert summary["index"]["rows"] == 40 and summary["update"]["mode"] == "merge"
    assert engine.refresh(wait=True) and len(engine.index) == 40
    assert _top(engine, FILES[64])["path"].endswith(f"/{FILES[64].name}")


def test_watch_results_adds_a_generation_that_similar_finds(spark, tmp_path):
    bucket, features, results = tmp_path / "Bucket", tmp_path / "Features", tmp_path / "Results"
    copy_images(FILES[:30], bucket)
    featurize_incremental(spark, str(bucket), str(features))
    reduce_features(spark, str(features), str(results), k=5, index=False)
    # An IVF index (its limit lowered): the new rows go into its lists, not a rebuild.
    build_index(spark, str(results), exact_max_elements=50)
    engine = QueryEngine(str(results))
    assert engine.index.meta["kind"] == "faiss-ivf" and engine.index.meta["generation"] == 1
    copy_images(FILES[80:86], bucket)
    opts = WatchParams(weights="bundled", available_now=True, results=str(results))
    watch(spark, str(bucket), str(features), opts)
    meta = json.loads((results / "index" / "index.json").read_text())
    assert meta["generation"] == 2 and meta["rows"] == 36 and meta["appended_rows"] == 6
    assert meta["kind"] == "faiss-ivf" and meta["ivf"]["file"] == "ivf-00002.faiss"
    assert meta["ivf"]["trained_rows"] == 30  # 36 rows: under twice the k-means' rows
    assert engine.refresh(wait=True) and len(engine.index) == 36
    assert _top(engine, FILES[83])["path"].endswith(f"/{FILES[83].name}")
    assert _top(QueryEngine(str(results)), FILES[81])["path"].endswith(f"/{FILES[81].name}")
