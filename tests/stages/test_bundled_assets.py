"""The bundled sample images and weights are intact and attributed."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from stages.featurize.litert import BUNDLED_TFLITE, BUNDLED_TFLITE_INFO
from stages.featurize.model import BUNDLED_WEIGHTS
from tests.conftest import SAMPLE


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sample_matches_its_manifest():
    with open(SAMPLE / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 100
    assert {r["file"] for r in rows} == {str(p.relative_to(SAMPLE)) for p in SAMPLE.glob("*/*.jpg")}
    for r in rows:
        f = SAMPLE / r["file"]
        assert f.stat().st_size == int(r["bytes"])
        assert _sha256(f) == r["sha256"]
    assert len({r["file"].split("/")[0] for r in rows}) == 10
    assert sum(int(r["bytes"]) for r in rows) < 1_000_000


def test_sample_carries_its_licence_and_attribution():
    readme = (SAMPLE / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "Mihai Oltean" in readme
    assert "Attribution-ShareAlike 4.0" in (SAMPLE / "LICENSE").read_text()


def test_bundled_weights_match_their_checksum():
    sums = dict(
        reversed(line.split())
        for line in (BUNDLED_WEIGHTS.parent / "SHA256SUMS").read_text().splitlines()
    )
    assert set(sums) == {BUNDLED_WEIGHTS.name, BUNDLED_TFLITE.name}
    assert _sha256(BUNDLED_WEIGHTS) == sums[BUNDLED_WEIGHTS.name]
    assert _sha256(BUNDLED_TFLITE) == sums[BUNDLED_TFLITE.name]
    assert "Apache License 2.0" in (BUNDLED_WEIGHTS.parent / "NOTICE.md").read_text()


@pytest.mark.tensorflow
def test_bundled_weights_are_the_real_imagenet_tensors():
    # 410,208 parameters: the Keras MobileNetV2 alpha-0.35 no-top count.
    from stages.featurize.model import resolve_weights

    spec, weights = resolve_weights("bundled")
    assert sum(w.size for w in weights) == 410_208
    assert spec.alpha == 0.35 and len(weights) == 260
    # The shipped flatbuffer says it was converted from these very tensors.
    info = json.loads(BUNDLED_TFLITE_INFO.read_text())
    assert info["weights_sha256"] == spec.weights_sha256 and info["alpha"] == 0.35


@pytest.mark.tensorflow
@pytest.mark.parametrize(("alpha", "width"), [(0.35, 1280), (1.0, 1280), (1.4, 1792)])
def test_feature_dim_is_the_models_real_output_width(alpha, width):
    # Regression: feature_dim said 1280 for every alpha, while alpha 1.3/1.4 give
    # 1664/1792 columns, so the footer misdescribed the vectors under it.
    from stages.featurize.model import resolve_weights

    spec, weights = resolve_weights("random:0", alpha)
    assert spec.feature_dim == width
    assert weights[-1].shape[-1] == width  # the last layer's width is the output's
