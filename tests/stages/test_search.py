"""The search index, the query decode and ``similar``: exact search against numpy,
the IVF index's recall, the label vote on photos left out of the results."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from linalg.vectors import VectorIndex
from stages.base.contract import THUMB_PX
from stages.cli import main
from stages.featurize.images import decode_photo
from stages.reduce.index import write_local_index
from stages.search.query import QueryEngine, SearchIndex, vote
from stages.search.upload import MAX_UPLOAD_BYTES, BadImage, decode_upload
from tests.conftest import SAMPLE, SHARED_DATA, left_out_results

PHOTO = SAMPLE / "Kiwi" / "4_100.jpg"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    crc = struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    idat = zlib.compress(b"\0" * 1024)
    idat_chunk = b"IDAT" + idat
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + crc
        + struct.pack(">I", len(idat))
        + idat_chunk
        + struct.pack(">I", zlib.crc32(idat_chunk) & 0xFFFFFFFF)
    )


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def bad_inputs():
    """(name, bytes, HTTP status, message fragment) of every kind of bad upload."""
    jpeg = PHOTO.read_bytes()
    return [
        ("empty", b"", 400, "empty"),
        ("text", b"name,label\nbanana,1\n" * 50, 415, "not an image"),
        ("truncated", jpeg[: len(jpeg) // 2], 422, "cannot decode"),
        ("flat", _png(np.full((120, 160, 3), 200, np.uint8)), 422, "one flat colour"),
        ("too-big", jpeg + b"\0" * (MAX_UPLOAD_BYTES + 1), 413, "over the limit of 10 MB"),
        ("bomb", _png_header(12_000, 10_000), 413, "12000x10000 pixels, over the limit"),
        ("huge-bomb", _png_header(30_000, 30_000), 413, "decompression bomb"),
    ]


def _ids(cases):
    return [c[0] for c in cases]


# ------------------------------------------------------------------------------ fast


class _Blocks:
    """Rows in blocks of ``size``, as :class:`stages.storage.shards.ShardSet` gives them."""

    def __init__(self, data: np.ndarray, size: int) -> None:
        self.data, self.size, self.shape = data, size, data.shape

    def blocks(self):
        return [(s, self.data[s : s + self.size]) for s in range(0, len(self.data), self.size)]

    def take(self, rows):
        return self.data[rows]


@settings(max_examples=60, deadline=None)
@given(
    data=arrays(
        np.float32,
        st.tuples(st.integers(1, 60), st.integers(1, 8)),
        elements=st.floats(-100, 100, width=32),
    ),
    top=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    block=st.one_of(st.none(), st.integers(1, 25)),
)
def test_exact_search_is_numpy_brute_force(data, top, seed, block):
    """Also with the rows in blocks (memory-mapped shards): each block's candidates, merged."""
    rng = np.random.default_rng(seed)
    q = rng.normal(scale=50, size=(3, data.shape[1])).astype(np.float32)
    q[0] = data[rng.integers(len(data))]  # a query that is a row: distance 0
    ids, dist = VectorIndex(data if block is None else _Blocks(data, block)).search(q, top)
    ref = np.sqrt(((q.astype(np.float64)[:, None, :] - data.astype(np.float64)) ** 2).sum(-1))
    m = min(top, len(data))
    assert ids.shape == dist.shape == (3, m)
    for i in range(3):
        order = np.lexsort((np.arange(len(data)), ref[i]))[:m]
        np.testing.assert_allclose(dist[i], ref[i][order], rtol=1e-12, atol=1e-9)
        # Equal distances may come in either order only when they are ties.
        np.testing.assert_allclose(ref[i][ids[i]], ref[i][order], rtol=1e-12, atol=1e-9)
        assert len(set(ids[i].tolist())) == m


@settings(max_examples=40, deadline=None)
@given(
    data=arrays(
        np.float32,
        st.tuples(st.integers(39, 400), st.integers(1, 8)),
        elements=st.floats(-100, 100, width=32),
    ),
    top=st.integers(1, 30),
    lists=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_ivf_search_probing_every_list_is_numpy_brute_force(data, top, lists, seed):
    """The IVF path (faiss's candidates, our float64 re-ranking) scanning all its lists
    finds the nearest distances, up to float32's rounding of the candidates' distances
    (rows nearer than that are ties to faiss); with one list probed, real rows, nearest
    first (exact search for a query whose list is short)."""
    from linalg.vectors import add_rows, train_ivf

    lists = max(1, min(lists, len(data) // 39))
    ivf = add_rows(train_ivf(data, lists, seed=seed % 1000), data)
    index = VectorIndex(data, ivf, nprobe=lists)
    rng = np.random.default_rng(seed)
    q = rng.normal(scale=50, size=(3, data.shape[1])).astype(np.float32)
    q[0] = data[rng.integers(len(data))]
    ids, dist = index.search(q, top)
    ref = np.sqrt(((q.astype(np.float64)[:, None, :] - data.astype(np.float64)) ** 2).sum(-1))
    m = min(top, len(data))
    for i in range(3):
        scale = 1.0 + np.linalg.norm(q[i]) + np.linalg.norm(data, axis=1).max()
        np.testing.assert_allclose(dist[i], np.sort(ref[i])[:m], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(ref[i][ids[i]], dist[i], rtol=1e-12, atol=1e-9)
    few, d_few = index.search(q, top, nprobe=1)
    assert (np.diff(d_few, axis=1) >= 0).all() and (few >= 0).all()
    assert all(len(set(r.tolist())) == len(r) for r in few)


def test_ivf_build_is_deterministic():
    """The same rows give the same IVF bytes (seeded sample and k-means): the same
    projections give the same index."""
    import faiss

    from linalg.vectors import add_rows, ivf_lists, train_ivf

    x = np.random.default_rng(3).normal(size=(5000, 12)).astype(np.float32)
    a = faiss.serialize_index(add_rows(train_ivf(x), x))
    b = faiss.serialize_index(add_rows(train_ivf(x), x))
    assert ivf_lists(len(x)) == 128 and a.tobytes() == b.tobytes()


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(40, d))
    return (centres[rng.integers(40, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_ivf_index_above_the_exact_limit_records_its_nprobe_and_recall(tmp_path):
    vectors = _clustered(3000, 16)
    n = len(vectors)
    meta = write_local_index(
        str(tmp_path),
        [f"/b/c{i % 40}/{i}.jpg" for i in range(n)],
        [f"c{i % 40}" for i in range(n)],
        vectors,
        [None] * n,
        "0" * 64,
        {},
        exact_max_elements=16_000,
        shard_rows=700,  # five shards: row ids run across them
    )
    assert meta["kind"] == "faiss-ivf" and meta["rows"] == n and meta["dims"] == 16
    assert len(meta["shards"]) == 5
    ivf = meta["ivf"]
    assert ivf["file"] == "ivf-00001.faiss" and ivf["lists"] == 3000 // 39
    assert ivf["trained_rows"] == n and ivf["nprobe"] in (4, 8, 16, 32, 64)
    # The smallest nprobe that reaches the target, and its measured recall.
    assert ivf["target_recall"] <= meta["recall_at_10"] <= 1.0
    index = SearchIndex(str(tmp_path))
    assert index.vectors.kind == "faiss-ivf" and index.vectors.nprobe == ivf["nprobe"]
    q = vectors[:50] + 0.01
    approx, d_approx = index.vectors.search(q, 10)
    exact, d_exact = index.vectors.search(q, 10, exact=True)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]) >= 0.9
    np.testing.assert_array_equal(approx[:, 0], np.arange(50))  # each row finds itself
    assert index.thumbnail(0) is None


def test_exact_index_below_the_limit(tmp_path):
    vectors = _clustered(200, 5)
    thumb = decode_photo(PHOTO.read_bytes(), thumb_px=THUMB_PX)[1]
    meta = write_local_index(
        str(tmp_path), [str(i) for i in range(200)], ["a"] * 200, vectors, [thumb] * 200,
        "0" * 64, {}, shard_rows=64,
    )  # fmt: skip
    assert meta["kind"] == "exact" and meta["recall_at_10"] == 1.0
    assert "ivf" not in meta and not list((tmp_path / "index").glob("*.faiss"))
    index = SearchIndex(str(tmp_path))
    exact, _ = index.vectors.search(vectors[:20], 5)
    np.testing.assert_array_equal(exact[:, 0], np.arange(20))
    assert index.thumbnail(199) == thumb and index.path(131) == "131"
    nd = meta["neighbour_distance"]
    assert 0 < nd["p50"] <= nd["p95"] <= nd["p99"] <= nd["max"]
    # One class: nothing to hold out, the fallback rule and why.
    assert meta["open_set"]["calibrated"] is False and "1 class" in meta["open_set"]["reason"]
    assert meta["open_set"]["reference"]["rows"] == meta["open_set"]["reference"]["of"] == 200
    from PIL import Image

    with Image.open(io.BytesIO(thumb)) as img:
        assert img.format == "JPEG" and max(img.size) == 96


@pytest.mark.parametrize(
    ("labels", "dist", "expected"),
    [
        (["a", "b", "a"], [1, 2, 3], {"label": "a", "count": 2, "of": 3, "margin": 1}),
        (["b", "a", "a", "b"], [1, 2, 3, 4], {"label": "b", "count": 2, "of": 4, "margin": 0}),
        (["c"], [5], {"label": "c", "count": 1, "of": 1, "margin": 1}),
        (["c", "c", "d"], [1, 2, 3], {"label": "c", "count": 2, "of": 3, "margin": 1}),
    ],
)
def test_vote(labels, dist, expected):
    assert vote(labels, dist) == expected


@pytest.mark.parametrize(("name", "data", "status", "match"), bad_inputs(), ids=_ids(bad_inputs()))
def test_bad_query_images(name, data, status, match):
    with pytest.raises(BadImage, match=match) as exc:
        decode_upload(data)
    assert exc.value.status == status


def test_query_decode_is_featurize_decode():
    from stages.featurize.images import decode_image

    data = PHOTO.read_bytes()
    np.testing.assert_array_equal(decode_upload(data), decode_image(data))


def test_similar_without_index_is_one_line(capsys, tmp_path):
    assert main(["similar", str(PHOTO), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fruits-pipeline: error: {tmp_path} has no pca_model/: give a RESULTS folder of `reduce`"
    ]


def test_similar_on_s3_results_says_how_to_copy(capsys):
    assert main(["similar", str(PHOTO), "s3://b/Results"]) == 2
    assert "aws s3 sync s3://b/Results/ ./Results/" in capsys.readouterr().err


# ------------------------------------------------------------------------------ model


def _votes(engine, left):
    return [(engine.similar_bytes(p.read_bytes())["vote"]["label"], label) for p, label in left]


@pytest.mark.slow
def test_left_out_sample_photos_vote_their_class(sample_engine, sample_left_out):
    results, left = sample_left_out
    assert len(left) == 10 and len({lab for _, lab in left}) == 10
    index = SearchIndex(str(results))
    paths = {index.path(i) for i in range(len(index))}
    assert len(index) == 90 and not set(map(str, (p for p, _ in left))) & paths
    votes = _votes(sample_engine, left)
    assert sum(got == want for got, want in votes) >= 9, votes
    answer = sample_engine.similar_bytes(left[0][0].read_bytes())
    assert answer["close_match"] and answer["verdict"].startswith(answer["vote"]["label"])
    assert len(answer["matches"]) == 10
    assert [m["distance"] for m in answer["matches"]] == sorted(
        m["distance"] for m in answer["matches"]
    )
    assert all(m["thumbnail"].startswith("data:image/jpeg;base64,") for m in answer["matches"])
    assert answer["model"]["weights_sha256"] == index.meta["features_model"]["weights_sha256"]


@pytest.mark.slow
def test_non_fruit_images_get_no_close_match(sample_engine, sample_left_out):
    from PIL import Image

    rng = np.random.default_rng(0)
    gradient = np.zeros((200, 300, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 300)
    gradient[..., 2] = 255 - gradient[..., 0]
    images = [
        Image.fromarray((rng.random((160, 200, 3)) * 255).astype(np.uint8)),  # noise
        Image.fromarray(gradient),  # blue to red
        Image.fromarray(
            np.kron([[0, 255] * 8, [255, 0] * 8] * 8, np.ones((12, 12))).astype(np.uint8)
        ),  # checkerboard
    ]
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        answer = sample_engine.similar_bytes(buf.getvalue())
        assert not answer["close_match"], answer["verdict"]
        assert answer["label"] is None and answer["photos"] is None
        assert answer["verdict"].startswith("This fruit does not look like any in the collection")
        assert not any(m["match"] for m in answer["matches"])
    # ...while every left-out fruit photo has one.
    _, left = sample_left_out
    assert all(sample_engine.similar_bytes(p.read_bytes())["close_match"] for p, _ in left)


@pytest.mark.slow
def test_similar_json_and_text(sample_left_out, sample_engine, capsys):
    results, left = sample_left_out
    photo, label = left[0]
    assert main(["similar", str(photo), str(results), "--top", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = sample_engine.similar_bytes(photo.read_bytes(), 5)
    assert [m["path"] for m in answer["matches"]] == [m["path"] for m in expected["matches"]]
    assert answer["vote"] == expected["vote"] and answer["vote"]["label"] == label
    assert set(answer) >= {"vote", "matches", "model"}
    assert set(answer["matches"][0]) >= {"path", "label", "distance", "thumbnail"}
    assert main(["similar", str(photo), str(results), "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{label} — 3 of the 3 nearest (margin 3); the collection holds 9 photos of it"
    assert out[1].startswith("open set: ") and "calibrated on the collection" in out[1]
    assert len(out) == 5


@pytest.mark.slow
def test_index_command_rebuilds_and_a_stale_index_is_refused(spark, sample_left_out, capsys):
    results, left = sample_left_out
    before = (results / "index" / "index.json").read_text()
    capsys.readouterr()
    assert main(["index", str(results), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # no progress, no JSON line
    assert json.loads((results / "index" / "index.json").read_text())["rows"] == 90
    assert main(["index", str(results), "-v"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert json.loads(captured.out)["rows"] == 90
    assert any(line.startswith("index: 90 rows, ") for line in err), err  # progress
    assert any(line.startswith("spark: fruits-pipeline index, master ") for line in err), err
    assert (
        json.loads(before)["pca_arrays_sha256"]
        == json.loads((results / "index" / "index.json").read_text())["pca_arrays_sha256"]
    )
    assert not [p for p in results.iterdir() if ".fruits-" in p.name]  # no temporary left
    meta = json.loads(before)
    meta["pca_arrays_sha256"] = "f" * 64
    (results / "index" / "index.json").write_text(json.dumps(meta))
    try:
        assert main(["similar", str(left[0][0]), str(results)]) == 2
        assert "was built from another PCA" in capsys.readouterr().err
    finally:
        (results / "index" / "index.json").write_text(before)


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"needs the 1000 Fruits-360 photos (25 classes) at {SHARED_DATA}: the bundled "
    "sample's 100 are too few for this vote",
)
def test_left_out_shared_photos_vote_their_class(spark, tmp_path):
    results, left = left_out_results(spark, SHARED_DATA, tmp_path)
    assert len(left) == 10 and len({lab for _, lab in left}) == 10
    engine = QueryEngine(str(results))
    assert engine.model_info["rows"] == 990
    votes = _votes(engine, left)
    assert sum(got == want for got, want in votes) >= 9, votes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("weights_sha256", "0" * 64, "are not the ones that made the features"),
        ("alpha", 1.0, "alpha"),
    ],
)
def test_a_query_refuses_other_weights(sample_left_out, tmp_path, capsys, field, value, match):
    import shutil

    results = tmp_path / "Results"
    shutil.copytree(sample_left_out[0], results)
    meta_path = results / "pca_model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["features_model"][field] = value
    meta_path.write_text(json.dumps(meta))
    assert main(["similar", str(PHOTO), str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
