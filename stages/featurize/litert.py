"""The LiteRT (TFLite) engine: the Keras model converted once to a flatbuffer.

Conversion (:func:`convert_to_tflite`) needs TensorFlow and is cached on disk by what made
it; the bundled weights ship their flatbuffer (``stages/weights/*.tflite``, in
``SHA256SUMS``) so the default run converts nothing.  :func:`litert_featurizer` runs it
with XNNPACK and never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import stages
from stages.base.cache import cache_root
from stages.base.errors import UsageError
from stages.featurize.images import IMAGE_SIZE
from stages.featurize.model import BUNDLED_WEIGHTS, ModelSpec, build_model
from stages.storage.fs import LocalFileSystem

logger = logging.getLogger(__name__)

SHA256SUMS = BUNDLED_WEIGHTS.parent / "SHA256SUMS"


BUNDLED_TFLITE = BUNDLED_WEIGHTS.with_suffix(".tflite")


# What made the bundled flatbuffer: the weights' tensor hash, alpha, converter version.
BUNDLED_TFLITE_INFO = BUNDLED_WEIGHTS.with_suffix(".tflite.json")


def _dist_version(*names: str) -> str:
    """An installed distribution's version without importing it ('' if absent)."""
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
    """Where driver-side conversions are kept (:func:`stages.base.cache.cache_root`)."""
    return cache_root() / "tflite"


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

    model = build_model(alpha, None)
    model.set_weights(weights)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    sys.stdout.flush()
    sys.stderr.flush()
    with _quiet_fds():
        return bytes(converter.convert())


def _tflite_name(spec: ModelSpec, version: str) -> str:
    return f"{spec.weights_sha256}-alpha{spec.alpha:g}-tf{version}.tflite"


def cached_conversion(spec: ModelSpec, weights: List[np.ndarray]) -> Tuple[bytes, str]:
    """The flatbuffer of ``weights`` from the driver's cache, converting on a miss."""
    version = converter_version()
    path = tflite_cache_dir() / _tflite_name(spec, version)
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


def is_bundled_copy(source: str) -> Optional[Path]:
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


def litert_versions(converter: str) -> Dict[str, str]:
    import PIL
    import pyspark

    return {
        "fruits_pipeline": stages.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pyspark": pyspark.__version__,
        "ai_edge_litert": litert_version(),
        "tflite_converter": f"tensorflow {converter}",
    }


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


# ---------------------------------------------------------------- resolution memo


def _keras_imagenet_file(alpha: float) -> Path:
    """Where Keras keeps the ImageNet weights of MobileNetV2 ``alpha`` (no top, 224 px)
    once downloaded (``keras.applications.MobileNetV2``'s file name, ``KERAS_HOME``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{IMAGE_SIZE}_no_top.h5"
    return Path(home) / "models" / name


def _weights_identity(source: str, alpha: float) -> Optional[List[Any]]:
    """What the weights of ``source`` at ``alpha`` are, known without TensorFlow: the
    seed, or the weights file's path, size and time; ``None`` when unknown (an ImageNet
    file not downloaded yet)."""
    if source.startswith("random:"):
        return [source]
    path = _keras_imagenet_file(alpha) if source == "imagenet" else Path(source).expanduser()
    try:
        st = path.resolve().stat()
    except OSError:
        return None
    return [source, str(path.resolve()), st.st_size, st.st_mtime_ns]


def _memo_path(source: str, alpha: float) -> Optional[Path]:
    ident = _weights_identity(source, alpha)
    if ident is None:
        return None
    key = json.dumps([ident, float(alpha), converter_version(), stages.__version__])
    return tflite_cache_dir() / f"resolved-{_sha256_bytes(key.encode())[:32]}.json"


def remembered_conversion(source: str, alpha: float) -> Optional[Tuple[ModelSpec, bytes]]:
    """The spec and flatbuffer a previous run resolved for ``source`` at ``alpha``, from
    the cache, without importing TensorFlow (it takes ~14 CPU-s to import, and building
    the Keras model to hash its weights more); ``None`` on a miss."""
    memo = _memo_path(source, alpha)
    if memo is None:
        return None
    try:
        saved = json.loads(memo.read_text())
        data = (tflite_cache_dir() / saved["tflite"]).read_bytes()
        if _sha256_bytes(data) != saved["tflite_sha256"]:
            return None
        spec = ModelSpec(**{**saved["spec"], "versions": litert_versions(converter_version())})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    logger.debug("featurize: weights and TFLite model from the cache: %s", memo)
    return spec, data


def remember_conversion(source: str, alpha: float, spec: ModelSpec, data: bytes) -> None:
    """Keep what :func:`remembered_conversion` reads (best effort: a read-only cache only
    costs the next run the import)."""
    memo = _memo_path(source, alpha)
    if memo is None:
        return
    name = _tflite_name(spec, converter_version())
    saved = {"spec": spec.to_dict(), "tflite": name, "tflite_sha256": _sha256_bytes(data)}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(memo, json.dumps(saved).encode())
    except OSError as exc:
        logger.debug("featurize: resolution not cached (%s)", exc)
