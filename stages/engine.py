"""Inference engines: LiteRT (a TFLite flatbuffer run by XNNPACK) or the Keras model.

``litert`` (the default) converts the Keras model once on the driver to a float32
TFLite flatbuffer with the weights inside, and broadcasts those bytes; each Python
worker builds one ``ai_edge_litert`` interpreter from them and never imports
TensorFlow (0.1 s and ~130 MB against 5 s and 0.7-1.9 GB for a Keras worker).
``keras`` broadcasts the weight arrays and builds the Keras model on each worker
(:mod:`stages.model`); it stays as the reference the LiteRT features are checked
against (max abs difference <= 2e-4, cosine >= 0.99999 per row).

Conversions are cached on the driver by weights SHA-256, alpha and converter
(TensorFlow) version; the bundled alpha-0.35 model also ships pre-converted
(``stages/weights/*.tflite``, in ``SHA256SUMS``) with a JSON of what made it, so
featurizing with the bundled weights needs no TensorFlow on the driver either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from stages.errors import UsageError
from stages.images import IMAGE_SIZE
from stages.model import BUNDLED_ALPHA, BUNDLED_WEIGHTS, ModelSpec, resolve_weights

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_TFLITE",
    "DEFAULT_BATCH",
    "DEFAULT_ENGINE",
    "check_engine",
    "default_engine",
    "ENGINES",
    "convert_to_tflite",
    "litert_featurizer",
    "prepare_model",
    "tflite_cache_dir",
]

ENGINES = ("litert", "keras")
DEFAULT_ENGINE = "litert"
# Images per model call.  XNNPACK runs small batches at least as fast as 64 (they stay in
# cache) in a fraction of the memory: alpha 1.0, one thread, peak RSS 106 MiB at 4,
# 131 at 8, 517 at 64 (benchmarks/README.md).  TensorFlow wants larger batches.
DEFAULT_BATCH = {"litert": 8, "keras": 64}
BUNDLED_TFLITE = BUNDLED_WEIGHTS.with_suffix(".tflite")
# What made the bundled flatbuffer: the weights' tensor hash, alpha, converter version.
BUNDLED_TFLITE_INFO = BUNDLED_WEIGHTS.with_suffix(".tflite.json")
SHA256SUMS = BUNDLED_WEIGHTS.parent / "SHA256SUMS"

# What a job broadcasts: the flatbuffer (litert) or the weight arrays (keras).
Payload = Union[bytes, List[np.ndarray]]


def _dist_version(*names: str) -> str:
    """An installed distribution's version without importing it ('' if absent)."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def converter_version() -> str:
    """The TensorFlow version that converts (part of the cache key)."""
    return _dist_version("tensorflow-cpu", "tensorflow")


def litert_version() -> str:
    """The installed ``ai-edge-litert`` version ('' if absent)."""
    return _dist_version("ai-edge-litert")


def tflite_cache_dir() -> Path:
    """Where driver-side conversions are kept (``FRUITS_CACHE`` or ``~/.cache``)."""
    base = os.environ.get("FRUITS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fruits-pipeline"
    )
    return Path(base) / "tflite"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _quiet_fds():
    """Silence C-level stdout/stderr (the converter prints pages of tensor specs)."""
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover - no /dev/null
        yield
        return
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def convert_to_tflite(weights: List[np.ndarray], alpha: float) -> bytes:
    """The Keras MobileNetV2 with ``weights`` as a float32 TFLite flatbuffer.

    No quantisation or other optimisation: the flatbuffer computes what the Keras
    graph computes, up to float32 summation order.  The batch dimension stays
    dynamic.
    """
    import tensorflow as tf

    from stages.model import build_model

    model = build_model(alpha, None)
    model.set_weights(weights)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    sys.stdout.flush()
    sys.stderr.flush()
    with _quiet_fds():
        return bytes(converter.convert())


def _cached_conversion(spec: ModelSpec, weights: List[np.ndarray]) -> Tuple[bytes, str]:
    """The flatbuffer of ``weights`` from the driver's cache, converting on a miss."""
    version = converter_version()
    name = f"{spec.weights_sha256}-alpha{spec.alpha:g}-tf{version}.tflite"
    path = tflite_cache_dir() / name
    try:
        data = path.read_bytes()
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("tflite_sha256") == _sha256_bytes(data):
            logger.debug("featurize: TFLite model read from the cache: %s", path)
            return data, version
    except (OSError, ValueError):
        pass
    logger.info(
        f"featurize: converting MobileNetV2 alpha={spec.alpha} to TFLite (cached in {path.parent})"
    )
    data = convert_to_tflite(weights, spec.alpha)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
        _atomic_write(
            path.with_suffix(".json"),
            json.dumps(
                {
                    "weights_sha256": spec.weights_sha256,
                    "alpha": spec.alpha,
                    "converter_version": version,
                    "tflite_sha256": _sha256_bytes(data),
                }
            ).encode(),
        )
    except OSError:
        pass  # a read-only home only costs a conversion next time
    return data, version


def _atomic_write(path: Path, data: bytes) -> None:
    from stages.fs import LocalFileSystem

    LocalFileSystem().write_bytes(str(path), data)  # written beside, renamed over


def _read_sums(folder: Path) -> Dict[str, str]:
    """``{file name: SHA-256}`` of ``folder/SHA256SUMS``."""
    sums = {}
    for line in (folder / SHA256SUMS.name).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1]] = parts[0]
    return sums


def bundled_tflite(h5: Path = BUNDLED_WEIGHTS) -> Tuple[bytes, Dict[str, Any]]:
    """The shipped flatbuffer of the bundled weights, checked against ``SHA256SUMS``.

    Parameters
    ----------
    h5 : Path
        The bundled ``.h5``; its folder holds the ``.tflite``, its ``.tflite.json``
        and ``SHA256SUMS`` (the package's ``stages/weights/``, or the copy the EMR
        bootstrap puts on each node).

    Raises
    ------
    UsageError
        The flatbuffer is missing or altered.
    """
    folder = h5.parent
    tflite = folder / BUNDLED_TFLITE.name
    sums = _read_sums(folder)
    try:
        data = tflite.read_bytes()
        info = json.loads((folder / BUNDLED_TFLITE_INFO.name).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"the bundled TFLite model {tflite.name} is unreadable ({exc}): "
            "reinstall the package, or pass --engine keras"
        ) from None
    if sums.get(tflite.name) != _sha256_bytes(data):
        raise UsageError(
            f"the bundled TFLite model {tflite.name} does not match SHA256SUMS: "
            "reinstall the package, or pass --engine keras"
        )
    return data, info


def _is_bundled_copy(source: str) -> Optional[Path]:
    """The path of ``source`` if it is a byte-identical copy of the bundled ``.h5``
    with its ``SHA256SUMS`` beside it (EMR nodes get such a copy), else ``None``."""
    path = Path(source).expanduser()
    if path.name != BUNDLED_WEIGHTS.name:
        return None
    try:
        sums = _read_sums(path.parent)
        digest = _sha256_bytes(path.read_bytes())
    except OSError:
        return None
    return path if sums.get(path.name) == digest and BUNDLED_TFLITE.name in sums else None


def default_engine() -> str:
    """``litert`` where ai-edge-litert is installed (Linux x86_64 and macOS arm64 wheels,
    Python 3.11-3.12), else ``keras``; the features' metadata records which ran."""
    return DEFAULT_ENGINE if litert_version() else "keras"


def check_engine(engine: str) -> None:
    """Refuse an unknown engine, or ``litert`` where ai-edge-litert is not installed.

    Raises
    ------
    UsageError
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown --engine {engine!r}: use litert or keras")
    if engine == "litert" and not litert_version():
        raise UsageError(
            "--engine litert needs the ai-edge-litert package (Linux x86_64 or macOS arm64, "
            "Python 3.11/3.12): pip install ai-edge-litert, or pass --engine keras"
        )


def _litert_versions(converter: str) -> Dict[str, str]:
    import PIL
    import pyspark

    import stages

    return {
        "fruits_pipeline": stages.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pyspark": pyspark.__version__,
        "ai_edge_litert": litert_version(),
        "tflite_converter": f"tensorflow {converter}",
    }


# (source, alpha, engine) -> (spec, payload): one driver converts or reads once.
_PREPARED: Dict[Tuple[str, Optional[float], str], Tuple[ModelSpec, Payload]] = {}


def prepare_model(
    source: str, alpha: Optional[float] = None, engine: Optional[str] = None
) -> Tuple[ModelSpec, Payload]:
    """Resolve the weights and what the workers need for ``engine``, on the driver.

    Parameters
    ----------
    source : str
        ``--weights`` (see :func:`stages.model.resolve_weights`).
    alpha : float, optional
    engine : {"litert", "keras"}, optional
        Default :func:`default_engine`.

    Returns
    -------
    spec : ModelSpec
        With ``engine`` set (and, for litert, the LiteRT and converter versions).
    payload : bytes or list of ndarray
        The TFLite flatbuffer (litert) or the weight arrays (keras), to broadcast.

    Raises
    ------
    UsageError
        Unknown engine, bad weights, ai-edge-litert missing.
    """
    engine = engine or default_engine()
    check_engine(engine)
    if engine == "keras":
        spec, weights = resolve_weights(source, alpha)
        return dataclasses.replace(spec, engine="keras"), weights
    key = (source, alpha, engine)
    if key in _PREPARED:
        return _PREPARED[key]
    copy = None if source == "bundled" else _is_bundled_copy(source)
    if (source == "bundled" or copy is not None) and alpha in (None, BUNDLED_ALPHA):
        data, info = bundled_tflite(copy or BUNDLED_WEIGHTS)
        spec = ModelSpec(
            alpha=BUNDLED_ALPHA,
            weights_source=(
                "bundled:" + BUNDLED_WEIGHTS.name if copy is None else f"file:{copy.resolve()}"
            ),
            weights_sha256=info["weights_sha256"],
            engine="litert",
            versions=_litert_versions(info["converter_version"]),
        )
    else:
        keras_spec, weights = resolve_weights(source, alpha)
        data, version = _cached_conversion(keras_spec, weights)
        spec = dataclasses.replace(keras_spec, engine="litert", versions=_litert_versions(version))
    _PREPARED.clear()
    _PREPARED[key] = (spec, data)
    return spec, data


# ---------------------------------------------------------------- executor side


def litert_featurizer(model: bytes, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A batch featurizer running the flatbuffer ``model`` with LiteRT (XNNPACK).

    Parameters
    ----------
    model : bytes
        A TFLite flatbuffer with input (n, 224, 224, 3) float32.
    threads : int
        XNNPACK threads (the cores given to one task).

    Returns
    -------
    callable
        ``f(x)`` with ``x`` float32 (n, 224, 224, 3) preprocessed, returning a new
        float32 (n, 1280) array.
    """
    from ai_edge_litert.interpreter import Interpreter

    # XNNPACK announces itself on stderr once per interpreter: no news for a user.
    with _quiet_fds():
        interp = Interpreter(model_content=model, num_threads=max(1, threads))
        inp = interp.get_input_details()[0]["index"]
        out = interp.get_output_details()[0]["index"]
        interp.resize_tensor_input(inp, [1, IMAGE_SIZE, IMAGE_SIZE, 3])
        interp.allocate_tensors()
    shape = [1]

    def featurize(x: np.ndarray) -> np.ndarray:
        n = int(x.shape[0])
        if n != shape[0]:
            # Cheap (~0.1 ms): XNNPACK keeps its packed weights across resizes.
            interp.resize_tensor_input(inp, [n, IMAGE_SIZE, IMAGE_SIZE, 3])
            interp.allocate_tensors()
            shape[0] = n
        interp.set_tensor(inp, np.ascontiguousarray(x, dtype=np.float32))
        interp.invoke()
        return interp.get_tensor(out)  # get_tensor copies: safe across invokes

    return featurize
