"""The inference engines: the shipped and cached TFLite flatbuffers, the LiteRT featurizer."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from stages.base.errors import UsageError
from stages.featurize import engine, litert
from stages.featurize.images import decode_image, preprocess
from tests.conftest import ROOT, SAMPLE


@pytest.fixture
def fresh_prepared(monkeypatch):
    """No driver-side memo of an earlier preparation."""
    monkeypatch.setattr(engine, "_PREPARED", {})


def _sample_batch(n: int) -> np.ndarray:
    files = sorted(SAMPLE.glob("*/*.jpg"))[:: 100 // n][:n]
    return preprocess(np.stack([decode_image(f.read_bytes()) for f in files]))


def test_bundled_model_needs_no_tensorflow_on_the_driver(tmp_path):
    # Also the copy the EMR bootstrap puts on each node (the step passes its .h5 path).
    for f in engine.BUNDLED_WEIGHTS.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    code = (
        "import sys\n"
        "from stages.featurize.engine import prepare_model\n"
        "spec, data = prepare_model('bundled')\n"
        "assert data[4:8] == b'TFL3', data[:8]\n"
        "assert spec.engine == 'litert' and spec.alpha == 0.35\n"
        "copy, same = prepare_model(sys.argv[1], None, 'litert')\n"
        "assert same == data and copy.weights_sha256 == spec.weights_sha256\n"
        "assert copy.weights_source == 'file:' + sys.argv[1], copy.weights_source\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'h5py') if m in sys.modules))\n"
    )
    h5 = tmp_path / engine.BUNDLED_WEIGHTS.name
    out = subprocess.run(
        [sys.executable, "-c", code, str(h5.resolve())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_altered_bundled_flatbuffer_is_refused(tmp_path, fresh_prepared):
    for f in engine.BUNDLED_WEIGHTS.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    altered = tmp_path / litert.BUNDLED_TFLITE.name
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="does not match SHA256SUMS: reinstall"):
        litert.bundled_tflite(tmp_path / engine.BUNDLED_WEIGHTS.name)
    with pytest.raises(UsageError, match="does not match SHA256SUMS: reinstall"):
        engine.prepare_model(str(tmp_path / engine.BUNDLED_WEIGHTS.name), None, "litert")


def test_unknown_engine_missing_litert_and_the_default(monkeypatch):
    with pytest.raises(UsageError, match="unknown --engine 'onnx'"):
        engine.check_engine("onnx")
    assert engine.default_engine() == "litert"
    monkeypatch.setattr(engine, "litert_version", lambda: "")
    with pytest.raises(UsageError, match="needs the ai-edge-litert package.*--engine keras"):
        engine.check_engine("litert")
    engine.check_engine("keras")  # the reference engine needs no LiteRT
    assert engine.default_engine() == "keras"  # where no wheel exists (Python 3.9, aarch64)


def test_litert_featurizer_is_batch_independent():
    spec, data = engine.prepare_model("bundled")
    x = _sample_batch(5)
    one = litert.litert_featurizer(data, threads=1)
    whole = one(x)
    assert whole.shape == (5, 1280) and whole.dtype == np.float32
    parts = np.concatenate([one(x[:2]), one(x[2:]), one(x[:1])])[:5]
    two_threads = litert.litert_featurizer(data, threads=2)(x)
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(two_threads, whole, rtol=0, atol=1e-6)
    assert whole.std() > 0.1 and (whole >= 0).all()  # ReLU6 then average pooling


@pytest.mark.slow
def test_conversion_is_cached_by_weights_alpha_and_converter(
    tmp_path, monkeypatch, fresh_prepared, caplog
):
    # A cache of its own: the session's may already hold this conversion (test order).
    tflite_cache = tmp_path
    monkeypatch.setenv("FRUITS_CACHE", str(tflite_cache))
    caplog.set_level(logging.INFO, logger="stages.featurize")
    spec, data = engine.prepare_model("random:5", 0.35, "litert")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert spec.engine == "litert" and len(lines) == 1 and "converting" in lines[0]
    cached = list((tflite_cache / "tflite").glob(f"{spec.weights_sha256}-alpha0.35-tf*.tflite"))
    assert len(cached) == 1 and cached[0].read_bytes() == data

    def no_conversion(*a, **kw):
        raise AssertionError("converted again")

    # A second run (a new driver: no memo) reads the cache.
    monkeypatch.setattr(engine, "_PREPARED", {})
    monkeypatch.setattr(litert, "convert_to_tflite", no_conversion)
    caplog.clear()
    again, data2 = engine.prepare_model("random:5", 0.35, "litert")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert data2 == data and again.weights_sha256 == spec.weights_sha256 and lines == []
    # A damaged cache entry is converted again, not used.
    cached[0].write_bytes(data[:1000])
    monkeypatch.setattr(engine, "_PREPARED", {})
    with pytest.raises(AssertionError, match="converted again"):
        engine.prepare_model("random:5", 0.35, "litert")


@pytest.mark.slow
def test_a_second_run_of_converted_weights_imports_no_tensorflow(tmp_path, fresh_prepared):
    """Weights other than the bundled file (random, ImageNet, a .h5) are built with Keras
    once; a later run, a new process, reads their spec and flatbuffer from the cache
    without importing TensorFlow (~14 CPU-s on the driver of every run, before)."""
    env = dict(os.environ, FRUITS_CACHE=str(tmp_path))
    code = (
        "import sys, hashlib\n"
        "from stages.featurize.engine import prepare_model\n"
        "spec, data = prepare_model('random:5', 0.35, 'litert')\n"
        "print(spec.weights_sha256, spec.weights_source, spec.feature_dim,"
        " hashlib.sha256(data).hexdigest(), 'tensorflow' in sys.modules)\n"
    )

    def run() -> list:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        return out.stdout.split()

    first, second = run(), run()
    assert first[-1] == "True" and second[-1] == "False"  # built once, then remembered
    assert first[:-1] == second[:-1] and second[1] == "random:5"
    assert len(list((tmp_path / "tflite").glob("resolved-*.json"))) == 1  # one memo


@pytest.mark.tensorflow
def test_a_weights_file_replaced_at_the_same_path_is_read_again(
    tflite_cache, fresh_prepared, tmp_path
):
    # A warm driver (a notebook, a second `run`) must not serve the flatbuffer of the file
    # that was at this path before.
    import h5py

    h5 = tmp_path / "weights.h5"
    shutil.copy(engine.BUNDLED_WEIGHTS, h5)  # no SHA256SUMS beside it: converted, not shipped
    first, data = engine.prepare_model(str(h5), 0.35, "litert")
    with h5py.File(h5, "r+") as f:
        names: list = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        kernel = f[sorted(names)[0]]
        kernel[...] = kernel[...] * 2.0
    second, data2 = engine.prepare_model(str(h5), 0.35, "litert")
    assert second.weights_sha256 != first.weights_sha256 and data2 != data
