"""Inference engines: LiteRT (a TFLite flatbuffer run by XNNPACK) or the Keras model.

``litert`` (the default) converts the Keras model once on the driver to a float32
TFLite flatbuffer with the weights inside, and broadcasts those bytes; each Python
worker builds one ``ai_edge_litert`` interpreter from them and never imports
TensorFlow (0.1 s and ~130 MB against 5 s and 0.7-1.9 GB for a Keras worker).
``keras`` broadcasts the weight arrays and builds the Keras model on each worker
(:mod:`stages.featurize.model`); it stays as the reference the LiteRT features are checked
against (max abs difference <= 2e-4, cosine >= 0.99999 per row).

Conversions are cached on the driver by weights SHA-256, alpha and converter
(TensorFlow) version; the bundled alpha-0.35 model also ships pre-converted
(``stages/weights/*.tflite``, in ``SHA256SUMS``) with a JSON of what made it, so
featurizing with the bundled weights needs no TensorFlow on the driver either.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from stages.base.errors import UsageError
from stages.base.params import ENGINES
from stages.featurize.litert import (
    bundled_tflite,
    cached_conversion,
    is_bundled_copy,
    litert_featurizer,
    litert_version,
    litert_versions,
    remember_conversion,
    remembered_conversion,
)
from stages.featurize.model import (
    BUNDLED_ALPHA,
    BUNDLED_WEIGHTS,
    ModelSpec,
    WeightsKey,
    keras_featurizer,
    resolve_weights,
    weights_key,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_ENGINE",
    "check_engine",
    "default_engine",
    "ENGINES",
    "litert_featurizer",
    "prepare_model",
]

DEFAULT_ENGINE = "litert"
# Images per model call.  XNNPACK on one thread (a task's core) spends the least CPU per
# image on small batches (they stay in cache): 4 / 8 / 16 images cost 1.68 / 1.77 / 1.92
# ms each at alpha 0.35, 8.0 / 8.7 / 9.3 ms at alpha 1.0, and peak RSS grows with the
# batch (alpha 1.0: 106 MiB at 4, 131 at 8, 517 at 64; benchmarks/README.md).
# TensorFlow wants larger batches.
DEFAULT_BATCH = {"litert": 4, "keras": 64}

# What a job broadcasts: the flatbuffer (litert) or the weight arrays (keras).
Payload = Union[bytes, List[np.ndarray]]


def default_engine() -> str:
    """``litert`` where ai-edge-litert is installed (wheels for Linux x86_64 and aarch64,
    macOS arm64, Python 3.11-3.12), else ``keras``; the features' metadata records which
    ran."""
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
            "--engine litert needs the ai-edge-litert package (Linux x86_64 or aarch64, "
            "macOS arm64; Python 3.11/3.12): pip install ai-edge-litert, or pass --engine keras"
        )


# (weights_key, engine) -> (spec, payload): one driver converts or reads once; the key holds
# the weights file's mtime and size, as resolve_weights' does (a replaced .h5 is read again).
_PREPARED: Dict[Tuple[WeightsKey, str], Tuple[ModelSpec, Payload]] = {}


def prepare_model(
    source: str, alpha: Optional[float] = None, engine: Optional[str] = None
) -> Tuple[ModelSpec, Payload]:
    """Resolve the weights and what the workers need for ``engine``, on the driver.

    Parameters
    ----------
    source : str
        ``--weights`` (see :func:`stages.featurize.model.resolve_weights`).
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
    key = (weights_key(source, alpha), engine)
    if key in _PREPARED:
        return _PREPARED[key]
    copy = None if source == "bundled" else is_bundled_copy(source)
    if (source == "bundled" or copy is not None) and alpha in (None, BUNDLED_ALPHA):
        data, info = bundled_tflite(copy or BUNDLED_WEIGHTS)
        spec = ModelSpec(
            alpha=BUNDLED_ALPHA,
            weights_source=(
                "bundled:" + BUNDLED_WEIGHTS.name if copy is None else f"file:{copy.resolve()}"
            ),
            weights_sha256=info["weights_sha256"],
            engine="litert",
            versions=litert_versions(info["converter_version"]),
        )
    else:
        # Every source but the bundled file defaults to alpha 1.0 (resolve_weights).
        alpha = 1.0 if alpha is None else alpha
        remembered = remembered_conversion(source, alpha)
        if remembered is not None:
            spec, data = remembered
        else:
            keras_spec, weights = resolve_weights(source, alpha)
            data, version = cached_conversion(keras_spec, weights)
            spec = dataclasses.replace(
                keras_spec, engine="litert", versions=litert_versions(version)
            )
            remember_conversion(source, alpha, spec, data)
    _PREPARED.clear()
    _PREPARED[key] = (spec, data)
    return spec, data


# ---------------------------------------------------------------- executor side


# weights hash -> batch featurizer; lives as long as the Python worker.
_FEATURIZERS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def get_featurizer(
    broadcast_model,
    key: str,
    alpha: float,
    threads: int = 1,
    on_build: Optional[Callable[[], None]] = None,
    engine: str = DEFAULT_ENGINE,
) -> Callable[[np.ndarray], np.ndarray]:
    """The batch featurizer of this Python worker, built on first use.

    Parameters
    ----------
    broadcast_model : pyspark.Broadcast
        The model's broadcast payload, read only when the model is built: the TFLite
        flatbuffer (``litert``, the default) or the weight arrays (``keras``).
    key : str
        The cache key: the weights' SHA-256, alpha and engine.
    alpha : float
    threads : int
        TensorFlow intra-op or XNNPACK threads: the executor cores given to one task.
    on_build : callable, optional
        Called once when the model is actually built (counts builds in tests).
    engine : {"keras", "litert"}
        ``litert`` never imports TensorFlow (:func:`stages.featurize.engine.litert_featurizer`).

    Returns
    -------
    callable
        ``f(x)`` with ``x`` float32 (n, 224, 224, 3) preprocessed, returning
        float32 (n, 1280).
    """
    fn = _FEATURIZERS.get(key)
    if fn is None:
        if engine == "litert":
            fn = litert_featurizer(broadcast_model.value, threads)
        else:
            fn = keras_featurizer(broadcast_model.value, alpha, threads)
        _FEATURIZERS.clear()  # one model per worker: drop one from an earlier job
        _FEATURIZERS[key] = fn
        if on_build is not None:
            on_build()
    return fn
