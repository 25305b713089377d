"""No image lost, none dropped in silence, none counted twice (hostile but fair inputs).

Every featurize here is checked by :func:`assert_one_row_per_image`: the output has
exactly one row per image file under INPUT (no duplicate path, none missing), against
a listing made here independently of the pipeline's own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.base.errors import UsageError
from stages.cli import main
from stages.featurize import featurize
from tests.conftest import ROOT, SAMPLE, killing_one_python_worker

pytestmark = pytest.mark.slow

KIWI = sorted((SAMPLE / "Kiwi").glob("*.jpg"))
BANANA = sorted((SAMPLE / "Banana").glob("*.jpg"))


def _image_files(top: Path) -> Dict[str, Path]:
    """``file:`` URI -> path of every file named *.jpg/*.jpeg (any case) under ``top``,
    symlinked folders not followed (the tests add what a followed link adds)."""
    out = {}
    for root, _, files in os.walk(top):
        for name in files:
            if name.lower().endswith((".jpg", ".jpeg")):
                out["file:" + os.path.join(root, name)] = Path(root) / name
    return out


def _rows(features: Path) -> Dict[str, dict]:
    t = pq.read_table(features).to_pylist()
    paths = [r["path"] for r in t]
    dupes = {p for p in paths if paths.count(p) > 1}
    assert not dupes, f"duplicate rows: {sorted(dupes)[:3]}"
    return {r["path"]: r for r in t}


def assert_one_row_per_image(
    features: Path, top: Path, extra: Iterable[str] = (), missing_ok: Iterable[str] = ()
) -> Dict[str, dict]:
    """Exactly one row per image file under ``top`` (plus ``extra`` URIs), no other."""
    rows = _rows(features)
    expected = (set(_image_files(top)) | set(extra)) - set(missing_ok)
    assert set(rows) == expected, (
        f"missing {sorted(expected - set(rows))[:5]}, unexpected {sorted(set(rows) - expected)[:5]}"
    )
    return rows


def _tree_digest(top: Path) -> Dict[str, str]:
    return {
        str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*"))
        if p.is_file()
    }


def _jpeg(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture
def photos(tmp_path) -> Path:
    """Two class folders of 5 real photos each."""
    top = tmp_path / "photos"
    for cls, files in (("Kiwi", KIWI[:5]), ("Banana", BANANA[:5])):
        (top / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, top / cls / f.name)
    return top


def _one_line(capsys, code: int, argv, match: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err
    return err


# ----------------------------------------------------------- outputs never hit inputs


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_featurize_overwrite_can_never_touch_the_input(photos, capsys, where):
    # Regression: `featurize D D --overwrite` emptied D, then crashed with 356 lines.
    out = {"same": photos, "parent": photos.parent, "inside": photos / "Kiwi" / "F"}[where]
    before = _tree_digest(photos)
    _one_line(
        capsys, 2, ["featurize", str(photos), str(out), "--overwrite"], "could destroy the input"
    )
    assert _tree_digest(photos) == before


def test_reduce_and_run_outputs_can_never_touch_their_inputs(sample_features, capsys, tmp_path):
    f = str(sample_features)
    before = _tree_digest(sample_features)
    _one_line(capsys, 2, ["reduce", f, f, "--overwrite", "--k", "5"], "RESULTS")
    _one_line(capsys, 2, ["reduce", f, f + "/Results", "--k", "5"], "is inside FEATURES")
    _one_line(capsys, 2, ["reduce", f, str(Path(f).parent), "--k", "5"], "contains FEATURES")
    _one_line(
        capsys, 2, ["run", str(SAMPLE), str(tmp_path / "R"), "--features", str(SAMPLE / "F")],
        "is inside INPUT",
    )  # fmt: skip
    assert _tree_digest(sample_features) == before


# --------------------------------------------------------------- writing is atomic


def test_a_swap_killed_between_its_two_renames_is_finished_by_the_next_run(spark, tmp_path):
    """Killed after the old output was moved aside and before the new one took its place:
    the next run on that output moves the old one back before anything else."""
    from stages.storage.outputs import atomic_output

    out = tmp_path / "Features"
    out.mkdir()
    (out / "part-0").write_text("old rows")
    aside = tmp_path / ".Features.fruits-old-0123456789ab"
    out.rename(aside)
    with pytest.raises(UsageError, match="already exists"):
        with atomic_output(spark, str(out), overwrite=False):
            pass
    assert (out / "part-0").read_text() == "old rows" and not aside.exists()
    # A swap that completed but died before deleting the old output: that one is garbage.
    shutil.copytree(out, aside)
    with atomic_output(spark, str(out), overwrite=True) as temp:
        assert not aside.exists()
        Path(temp).mkdir()
        (Path(temp) / "part-0").write_text("new rows")
    assert (out / "part-0").read_text() == "new rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Features"]


def test_featurize_overwrite_killed_mid_write_leaves_the_old_output_whole(
    spark, photos, tmp_path
):  # spark: the in-process main() below reuses the session's one SparkContext
    # Regression: --overwrite deleted the old output when the job started; a kill -9
    # then left nothing.  Now the new output is written beside and swapped in.
    out = tmp_path / "Features"
    assert main(["featurize", str(photos / "Kiwi"), str(out), "--quiet"]) == 0
    old = _rows(out)
    more = tmp_path / "more"
    for i in range(8):  # enough images that the job is still running when killed
        shutil.copytree(photos, more / f"c{i}")
    env = dict(os.environ, FRUITS_LOG_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "featurize", str(more), str(out), "--overwrite",
         "--quiet", "--master", "local[2]"],
        cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        # Kill once the new output is being written beside the old one.
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".Features.fruits-tmp-") for p in tmp_path.iterdir()):
                time.sleep(0.5)
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _rows(out) == old  # the old output, whole and readable
    assert (out / "_SUCCESS").exists()


def test_reduce_that_fails_leaves_old_results_and_no_temporary(
    spark, sample_features, tmp_path, monkeypatch
):
    from stages.reduce import reduce_features
    from stages.reduce.pca_model import PCAModel

    results = tmp_path / "Results"
    reduce_features(spark, str(sample_features), str(results), k=3)
    before = _tree_digest(results)

    def broken(self, spark, uri):
        raise OSError("disk full")

    monkeypatch.setattr(PCAModel, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        reduce_features(spark, str(sample_features), str(results), k=4, overwrite=True)
    assert _tree_digest(results) == before
    assert [p.name for p in tmp_path.iterdir()] == ["Results"]  # no temporary left


def test_read_only_output_folder_is_refused_before_any_image_is_read(photos, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available: cannot make a folder read-only for root")
    try:
        t0 = time.perf_counter()
        _one_line(
            capsys, 2, ["featurize", str(photos), str(parent / "F")], "cannot write beside output"
        )
        assert time.perf_counter() - t0 < 60  # refused up front, not after the job
    finally:
        subprocess.run(["chattr", "-i", str(parent)], capture_output=True)


# ---------------------------------------------------- every image file is one row


def test_hidden_names_symlinks_loops_and_odd_names(spark, photos, tmp_path):
    kiwi = photos / "Kiwi"
    data = KIWI[0].read_bytes()
    (kiwi / "_DSC0001.JPG").write_bytes(data)  # Nikon/Sony Adobe-RGB naming
    (kiwi / ".hidden.jpg").write_bytes(data)
    (photos / "_Drafts").mkdir()
    (photos / "_Drafts" / "x.jpeg").write_bytes(data)
    (kiwi / "colon:x.jpg").write_bytes(data)
    (kiwi / "br[1].jpg").write_bytes(data)
    (kiwi / "cur{a,b}.jpg").write_bytes(data)
    (kiwi / "._apple.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\x00" * 80)
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(data)
    (kiwi / "link.jpg").symlink_to(outside)  # a symlinked file: read once
    (kiwi / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (kiwi / "loop.jpg").symlink_to(kiwi / "loop.jpg")
    (kiwi / "up").symlink_to("..")  # a folder loop: 2 images became 82 rows
    (kiwi / "empty.jpg").write_bytes(b"")
    out = tmp_path / "F"
    report = featurize(spark, str(photos), str(out), weights="bundled")
    rows = assert_one_row_per_image(out, photos)
    assert report.images == len(rows) == 10 + 11
    kiwi_dsc = "file:" + str(kiwi / "_DSC0001.JPG")
    err = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert err == {
        "._apple.jpg": "macOS AppleDouble metadata file (a '._' name), not a photo",
        "dangling.jpg": "broken symbolic link (its target does not exist)",
        "loop.jpg": "symbolic link loop",
        "empty.jpg": "empty file (0 bytes)",
    }
    assert report.errors == 4
    ok = {Path(p).name: r for p, r in rows.items() if not r["error"]}
    assert ok["_DSC0001.JPG"]["label"] == "Kiwi" and ok["x.jpeg"]["label"] == "_Drafts"
    same = np.array(ok["link.jpg"]["features"])
    np.testing.assert_array_equal(np.array(ok["colon:x.jpg"]["features"]), same)
    np.testing.assert_array_equal(np.array(ok["_DSC0001.JPG"]["features"]), same)

    # --incremental lists by the same rule (it used Spark's listing, which skips the '_'
    # and '.' names: _DSC0001.JPG, .hidden.jpg, _Drafts/ and ._apple.jpg were lost).
    inc = tmp_path / "F_incremental"
    first = featurize(spark, str(photos), str(inc), weights="bundled", incremental=True)
    inc_rows = _rows(inc)
    assert set(inc_rows) == set(rows) and first.new == len(rows)
    assert {p for p, r in inc_rows.items() if r["error"]} == {
        p for p, r in rows.items() if r["error"]
    }
    np.testing.assert_array_equal(np.array(inc_rows[kiwi_dsc]["features"]), same)
    again = featurize(spark, str(photos), str(inc), weights="bundled", incremental=True)
    assert again.run is None and again.new == again.changed == 0


def test_input_path_with_glob_characters_is_taken_literally(spark, photos, tmp_path):
    odd = tmp_path / "shots [2026] {a,b}"
    shutil.copytree(photos, odd)
    (tmp_path / "shots 2").mkdir()  # what the glob [2026] would also match
    shutil.copy(KIWI[0], tmp_path / "shots 2" / "decoy.jpg")
    out = tmp_path / "F"
    featurize(spark, str(odd), str(out), weights="bundled")
    assert_one_row_per_image(out, odd)


def test_non_ascii_names_under_the_c_locale(tmp_path):
    # Regression: with LC_ALL=C the JVM could not spell Pêche/ and 21 of 31 photos
    # were dropped, exit 0.
    top = tmp_path / "in"
    for cls, files in (("Pêche", KIWI[:3]), ("Äpfel 🍎", BANANA[:3])):
        (top / cls).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, top / cls / f"fruit-é{i}.jpg")
    out = tmp_path / "Features"
    env = dict(os.environ, LC_ALL="C", LANG="C", FRUITS_LOG_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "featurize", str(top), str(out), "--quiet",
         "--master", "local[2]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = assert_one_row_per_image(out, top)
    assert sorted({r["label"] for r in rows.values()}) == ["Pêche", "Äpfel 🍎"]
    assert all(r["error"] is None for r in rows.values())


# --------------------------------------------------- decoding refuses what is junk


def test_junk_decodes_are_error_rows_and_real_16_bit_photos_are_features(spark, tmp_path):
    top = tmp_path / "in" / "Odd"
    top.mkdir(parents=True)
    rng = np.random.default_rng(0)
    gradient = (np.linspace(0, 65535, 160)[None, :] * np.ones((120, 1))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")  # 16-bit greyscale, named .jpg
    (top / "sixteen-bit.jpg").write_bytes(buf.getvalue())
    (top / "grey.jpg").write_bytes(_jpeg(np.full((300, 300, 3), 128, np.uint8)))
    bomb = bytearray(_jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
    sof = bomb.find(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (14000).to_bytes(2, "big") * 2  # claims 14000 x 14000
    (top / "bomb.jpg").write_bytes(bytes(bomb))
    shutil.copy(KIWI[0], top / "real.jpg")
    out = tmp_path / "F"
    featurize(spark, str(tmp_path / "in"), str(out), weights="bundled")
    rows = {Path(p).name: r for p, r in assert_one_row_per_image(out, tmp_path / "in").items()}
    assert rows["grey.jpg"]["error"].startswith("decoded to one flat colour (100% of pixels)")
    assert "14000 x 14000 pixels (196 MP), above the 100 MP limit" in rows["bomb.jpg"]["error"]
    assert rows["sixteen-bit.jpg"]["error"] is None  # scaled to 8 bits, not clipped white
    assert rows["real.jpg"]["error"] is None


def test_flat_decodes_are_refused_and_real_photos_are_not():
    from stages.featurize.images import FLAT_SHARE, DecodeError, decode_image

    photo = np.asarray(Image.open(KIWI[0]).convert("RGB").resize((400, 400)))
    truncated = photo.copy()
    truncated[8:] = 128  # what a JPEG cut after its first rows decodes to
    with pytest.raises(DecodeError, match=r"decoded to one flat colour \(9[5-9]% of pixels\)"):
        decode_image(_jpeg(truncated, quality=100))
    white = np.full((400, 400), 65535, np.uint16)  # a 16-bit PNG that is really white
    buf = io.BytesIO()
    Image.fromarray(white).save(buf, format="PNG")
    with pytest.raises(DecodeError, match="flat colour"):
        decode_image(buf.getvalue())
    for f in KIWI + BANANA:
        decode_image(f.read_bytes())  # real photos pass
    assert FLAT_SHARE == 0.95


# ------------------------------------------------------------------- EXIF orientation


def test_exif_orientation_is_applied_by_default_and_can_be_ignored(spark, tmp_path):
    from stages.featurize.images import decode_image

    photo = np.asarray(Image.open(KIWI[0]).convert("RGB").resize((120, 80)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": how phones store portrait shots
    tagged = _jpeg(photo, exif=exif.tobytes(), quality=95)
    upright = np.asarray(Image.open(io.BytesIO(tagged)).rotate(-90, expand=True))
    as_seen = decode_image(tagged)
    stored = decode_image(tagged, exif_orientation=False)
    # Turned: the decode matches the upright picture, not the stored one.
    ref_up = np.asarray(
        Image.fromarray(upright).resize((224, 224), Image.BILINEAR), dtype=np.float64
    )
    ref_stored = np.asarray(
        Image.open(io.BytesIO(tagged)).convert("RGB").resize((224, 224), Image.BILINEAR),
        dtype=np.float64,
    )
    assert np.abs(as_seen - ref_up).mean() < np.abs(as_seen - ref_stored).mean() / 3
    np.testing.assert_array_equal(stored, ref_stored.astype(np.uint8))

    top = tmp_path / "in" / "Kiwi"
    top.mkdir(parents=True)
    (top / "portrait.jpg").write_bytes(tagged)
    shutil.copy(KIWI[1], top / "other.jpg")
    feats = {}
    for flag in (True, False):
        out = tmp_path / f"F{flag}"
        featurize(spark, str(tmp_path / "in"), str(out), weights="bundled", exif_orientation=flag)
        rows = assert_one_row_per_image(out, tmp_path / "in")
        feats[flag] = {Path(p).name: np.array(r["features"]) for p, r in rows.items()}
        footer = pq.read_metadata(next(out.glob("*.parquet"))).metadata
        fields = json.loads(footer[b"org.apache.spark.sql.parquet.row.metadata"])["fields"]
        spec = next(f for f in fields if f["name"] == "features")["metadata"]["fruits_pipeline"]
        assert spec["exif_orientation"] is flag
    assert not np.allclose(feats[True]["portrait.jpg"], feats[False]["portrait.jpg"])
    np.testing.assert_array_equal(feats[True]["other.jpg"], feats[False]["other.jpg"])


# ----------------------------------------------------------------- retries and checks


def test_a_killed_python_worker_is_retried_and_the_output_is_exact(spark, photos, tmp_path):
    # Regression: local mode ran each task once, so one killed worker failed the job.
    assert spark.sparkContext.master.endswith(",4]")  # local[N,4]: 4 attempts a task
    big = tmp_path / "big"
    for i in range(6):
        shutil.copytree(photos, big / f"c{i}")
    out = tmp_path / "F"
    with killing_one_python_worker(lambda: [os.getpid()]) as killed:
        report = featurize(spark, str(big), str(out), weights="random:5", alpha=0.35)
    assert killed, "no Python worker was seen to kill"
    rows = assert_one_row_per_image(out, big)
    assert report.images == len(rows) == 60 and report.errors == 0


def test_reduce_refuses_uncommitted_features_and_k_above_the_rank(spark, sample_features, tmp_path):
    from stages.reduce import reduce_features

    partial = tmp_path / "partial"
    shutil.copytree(sample_features, partial)
    (partial / "_SUCCESS").unlink()  # what a killed run leaves: parts, no marker
    with pytest.raises(UsageError, match="have no _SUCCESS marker: the run that wrote them"):
        reduce_features(spark, str(partial), str(tmp_path / "R1"), k=2)
    # 100 rows: at most 99 components carry variance.
    with pytest.raises(UsageError, match=r"--k 120 is above the rank 99 of these features"):
        reduce_features(spark, str(sample_features), str(tmp_path / "R2"), k=120)
    assert not (tmp_path / "R1").exists() and not (tmp_path / "R2").exists()


def test_an_unreadable_file_is_an_error_row_in_the_listing(tmp_path, monkeypatch):
    # `chmod 000` aborted the whole job as a non-root user (SparkFileNotFoundException).
    # Root reads any file, so the permission answer is simulated; the rule is what is tested.
    import stages.featurize.listing as listing

    top = tmp_path / "in" / "Kiwi"
    top.mkdir(parents=True)
    for f in KIWI[:3]:
        shutil.copy(f, top / f.name)
    locked = top / KIWI[0].name
    real_access = os.access
    monkeypatch.setattr(
        listing.os, "access", lambda p, mode: False if p == str(locked) else real_access(p, mode)
    )
    got = listing.walk_images(str(tmp_path / "in"))
    assert got.errors == [(str(locked), "permission denied")]
    assert sorted(p for p, _ in got.files) == sorted(str(top / f.name) for f in KIWI[1:3])


def test_a_file_name_that_is_not_utf8_is_an_error_row_not_a_failed_run(spark, tmp_path):
    # A Latin-1 name (b"caf\xe9.jpg") made pa.array raise UnicodeEncodeError: the whole
    # --incremental run (and plain featurize) failed for one photo.
    top = tmp_path / "in" / "Kiwi"
    top.mkdir(parents=True)
    shutil.copy(KIWI[0], top / KIWI[0].name)
    with open(os.path.join(os.fsencode(top), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(KIWI[1].read_bytes())
    shown = "file:" + str(top) + "/caf\\xe9.jpg"
    for name, incremental in (("F", False), ("F_incremental", True)):
        out = tmp_path / name
        featurize(spark, str(tmp_path / "in"), str(out), weights="bundled", incremental=incremental)
        rows = _rows(out)
        assert set(rows) == {"file:" + str(top / KIWI[0].name), shown}, name
        assert rows[shown]["features"] is None and rows[shown]["error"], name
    assert _rows(tmp_path / "F")[shown]["error"] == "file name is not valid UTF-8: rename the file"
