"""The open-set rule in the app: an index refuses fruits it does not hold and names the ones it
does (real photos, real model, real index), deterministically; a one-class collection falls
back to the documented rule and says so."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from stages.base.errors import UsageError
from stages.cli import main
from stages.reduce.index import write_local_index
from stages.search.query import NO_MATCH, QueryEngine, SearchIndex
from tests.conftest import SHARED_DATA

PER_CLASS = 20  # photos of each class used: 15 indexed + 5 asked, or 20 asked (unknown)
ASKED = 5


def _clustered(n_classes: int, per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(n_classes, 12))
    labels = [f"c{i}" for i in range(n_classes) for _ in range(per_class)]
    vectors = np.repeat(centres, per_class, axis=0) + rng.normal(size=(len(labels), 12))
    return vectors.astype(np.float32), labels


def test_the_calibration_at_index_build_is_deterministic(tmp_path):
    vectors, labels = _clustered(12, 15)
    paths = [f"/b/{lab}/{i}.jpg" for i, lab in enumerate(labels)]
    rules = []
    for run in range(2):
        meta = write_local_index(
            str(tmp_path / str(run)), paths, labels, vectors, [None] * len(paths), "0" * 64, {}
        )
        rule = meta["open_set"]
        rule.pop("calibration_s")
        rules.append(rule)
    assert rules[0] == rules[1]
    assert rules[0]["calibrated"] and rules[0]["reference"] == {
        "rows": 180,
        "of": 180,
        "seed": 0,
        "sampled_by": "blake2b-64 of the path",
        "ordered_by": "path",
    }
    assert rules[0]["repeats"] == 5 and rules[0]["held_out_classes_per_repeat"] == 2
    for key in ("known_accepted", "unknown_rejected", "auroc", "fpr_at_95_tpr"):
        assert 0.0 <= rules[0][key] <= 1.0


@pytest.mark.parametrize("rows_max", [None, 100], ids=["all rows", "a sample of 100"])
def test_the_calibration_does_not_depend_on_the_rows_order(tmp_path, monkeypatch, rows_max):
    """The same photos stored in three orders and shardings (as Spark's partitions would
    store them) give the same reference photos, rule, threshold and rates, and the app
    scores a query the same way."""
    from linalg.openset import reference_rows
    from stages.reduce import index_stats

    if rows_max is not None:  # the sampled reference set, as above CALIBRATION_ROWS
        monkeypatch.setattr(index_stats, "CALIBRATION_ROWS", rows_max)
    vectors, labels = _clustered(12, 15)
    paths = [f"/b/{lab}/{i}.jpg" for i, lab in enumerate(labels)]
    n = len(paths)
    orders = [(np.arange(n), None), (np.arange(n)[::-1], 7)]
    orders.append((np.random.default_rng(1).permutation(n), 50))
    queries = vectors[::9] + np.random.default_rng(2).normal(scale=2.0, size=(20, 12))
    rules, refs, scores = [], [], []
    for run, (order, shard_rows) in enumerate(orders):
        folder = tmp_path / str(run)
        meta = write_local_index(
            str(folder), [paths[i] for i in order], [labels[i] for i in order], vectors[order],
            [None] * n, "0" * 64, {}, shard_rows=shard_rows,
        )  # fmt: skip
        rule = meta["open_set"]
        rule.pop("calibration_s")
        rules.append(rule)
        index = SearchIndex(str(folder))
        ids = reference_rows(index.rows.key_blocks(), rule["reference"]["rows"])
        refs.append(sorted(index.path(int(i)) for i in ids))
        scores.append(index.open_set.accept(queries))
    assert rules[0]["reference"]["rows"] == (rows_max or n)
    assert rules[1] == rules[0] and rules[2] == rules[0]
    assert refs[1] == refs[0] and refs[2] == refs[0]
    for accepted, score, in_range in scores[1:]:
        assert np.array_equal(accepted, scores[0][0]) and np.array_equal(score, scores[0][1])
        assert np.array_equal(in_range, scores[0][2])


def test_an_index_without_the_rule_is_refused(tmp_path):
    vectors, labels = _clustered(3, 10)
    paths = [f"/b/{i}.jpg" for i in range(len(labels))]
    meta = write_local_index(
        str(tmp_path), paths, labels, vectors, [None] * len(paths), "0" * 64, {}
    )
    assert SearchIndex(str(tmp_path)).open_set.rule["calibrated"]
    del meta["open_set"]
    meta["format"] = 1  # an index of before the open-set rule
    (tmp_path / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="another format: run `fruits-pipeline index`"):
        SearchIndex(str(tmp_path))


@pytest.mark.slow
def test_a_one_class_collection_falls_back_and_says_so(sample_left_out, tmp_path, capsys):
    results = tmp_path / "Results"
    shutil.copytree(sample_left_out[0], results)
    full = SearchIndex(str(results))
    rows = [i for i in range(len(full)) if full.label(i) == "Kiwi"]
    # The same PCA and vectors, only the Kiwi rows: a one-class collection.
    shutil.rmtree(results / "index")
    meta = write_local_index(
        str(results),
        [full.path(i) for i in rows],
        ["Kiwi"] * len(rows),
        full.rows.take(np.array(rows)),
        [full.thumbnail(i) for i in rows],
        full.meta["pca_arrays_sha256"],
        full.meta["features_model"],
    )
    rule = meta["open_set"]
    assert rule["calibrated"] is False and rule["reason"].startswith("1 class")
    assert rule["threshold"] > 0 and "fallback" in rule
    lemon = next(p for p, lab in sample_left_out[1] if lab == "Lemon")
    assert main(["similar", str(lemon), str(results), "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "not calibrated: 1 class" in out[1] and "fallback" in out[1], out
    answer = json.loads(_similar_json(lemon, results, capsys))
    assert answer["model"]["open_set"]["calibrated"] is False
    assert answer["model"]["open_set"]["reason"] == rule["reason"]


def _similar_json(photo, results, capsys) -> str:
    assert main(["similar", str(photo), str(results), "--json"]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"needs the 1000 Fruits-360 photos (25 classes) at {SHARED_DATA}",
)
def test_an_index_without_five_classes_refuses_them(spark, tmp_path):
    from stages.featurize import featurize
    from stages.reduce import reduce_features

    classes = sorted(p.name for p in SHARED_DATA.iterdir() if p.is_dir())
    unknown = set(classes[::5])  # 5 of the 25, spread over the alphabet
    known_asked, unknown_asked = [], []
    for name in classes:
        photos = sorted((SHARED_DATA / name).glob("*.jpg"))[:PER_CLASS]
        if name in unknown:
            unknown_asked += [(p, name) for p in photos]
            continue
        asked = photos[:: PER_CLASS // ASKED][:ASKED]
        known_asked += [(p, name) for p in asked]
        (tmp_path / "Images" / name).mkdir(parents=True)
        for p in photos:
            if p not in asked:
                shutil.copyfile(p, tmp_path / "Images" / name / p.name)
    featurize(spark, str(tmp_path / "Images"), str(tmp_path / "Features"), weights="bundled")
    reduce_features(spark, str(tmp_path / "Features"), str(tmp_path / "Results"), variance=0.95)
    engine = QueryEngine(str(tmp_path / "Results"))
    rule = engine.index.meta["open_set"]
    assert rule["calibrated"] and rule["classes"] == 20 and rule["reference"]["rows"] == 300

    def answers(asked):
        points = engine.embed(np.stack([engine.decode(p.read_bytes()) for p, _ in asked]))
        return [engine.answer(point) for point in points]

    known = answers(known_asked)
    right = sum(a["label"] == lab for a, (_, lab) in zip(known, known_asked))
    refused = [a for a in answers(unknown_asked) if a["label"] is None]
    # Measured: 99 of the 100 known photos named right and 95 of the 100 unknown refused (the
    # rule the bucket picked: ratio), whatever the partitioning: the calibration takes its
    # reference rows in path order (before, the shards' partition order made it pick knn1
    # and refuse 74).  Path order does not depend on where tmp_path lies, so the seeded split
    # is the same on every run; other seeds refuse 59-100 of these (median 98: search_bench.py
    # --openset-only, "seeds").  Asserted with a margin.
    assert right >= 90, right
    assert len(refused) >= 85, len(refused)
    a = refused[0]
    assert not a["close_match"] and a["photos"] is None and a["verdict"].startswith(NO_MATCH)
    assert len(a["matches"]) == 10 and not any(m["match"] for m in a["matches"])
    ok = next(a for a, (_, lab) in zip(known, known_asked) if a["label"] == lab)
    assert ok["photos"] == 15 and ok["close_match"] and ok["vote"]["margin"] >= 0
    assert ok["verdict"].startswith(f"{ok['label']} — ") and "holds 15 photos" in ok["verdict"]
