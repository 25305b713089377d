"""MobileNetV2: weights resolved once on the driver, broadcast, built once per Python worker.

Driver side, :func:`resolve_weights` turns ``--weights`` into a list of numpy arrays
(a Keras download for ``imagenet``, the bundled alpha-0.35 file, a local ``.h5``
file, or seeded random weights) plus a :class:`ModelSpec` recording what made the
features.  The arrays are broadcast; executor side, :func:`get_featurizer` builds
the architecture with ``weights=None``, sets the broadcast weights and keeps the
compiled graph in a module-level cache for the life of the Python worker, so an
executor never reads a weights file or the network and never rebuilds per batch.

TensorFlow is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import stages
from stages.base.errors import UsageError
from stages.base.options import check_alpha
from stages.featurize.images import IMAGE_SIZE

__all__ = [
    "BUNDLED_WEIGHTS",
    "FEATURE_DIM",
    "ModelSpec",
    "resolve_weights",
    "build_model",
    "weights_sha256",
]

FEATURE_DIM = 1280
MODEL_NAME = "MobileNetV2"
BUNDLED_WEIGHTS = (
    Path(__file__).parents[1] / "weights" / "mobilenet_v2_imagenet_alpha0.35_224_no_top.h5"
)
BUNDLED_ALPHA = 0.35
# Alphas for which Keras publishes ImageNet weights at 224 px.
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
_RANDOM = re.compile(r"^random:(\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    """What made a set of features; written to the features' Parquet metadata."""

    alpha: float
    weights_source: str
    weights_sha256: str
    name: str = MODEL_NAME
    input_size: int = IMAGE_SIZE
    pooling: str = "avg"
    feature_dim: int = FEATURE_DIM
    # Whether photos were turned as their EXIF orientation tag says before the resize.
    exif_orientation: bool = True
    engine: str = "keras"
    # Pillow JPEG draft factor (0: full decode); see stages.featurize.images.decode_image.
    jpeg_draft: int = 0
    versions: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def weights_sha256(weights: List[np.ndarray]) -> str:
    """SHA-256 of the weight tensors as raw little-endian float32, in model order."""
    h = hashlib.sha256()
    for w in weights:
        h.update(np.ascontiguousarray(w, dtype="<f4").tobytes())
    return h.hexdigest()


def library_versions() -> Dict[str, str]:
    """Versions of the libraries that shape the features."""
    import PIL
    import pyspark

    versions = {
        "fruits_pipeline": stages.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pyspark": pyspark.__version__,
    }
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        versions["keras"] = tf.keras.__version__ if hasattr(tf.keras, "__version__") else ""
    except ImportError:  # pragma: no cover - tensorflow is a dependency
        pass
    return versions


def build_model(alpha: float, weights: Optional[str] = None):
    """Keras MobileNetV2 feature extractor: 224x224x3 input, 1280-d average-pooled output.

    Parameters
    ----------
    alpha : float
        Width multiplier.
    weights : str, optional
        ``None`` (random init), ``"imagenet"`` or a path to an ``.h5`` weights file.
    """
    import tensorflow as tf

    return tf.keras.applications.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        alpha=alpha,
        include_top=False,
        weights=weights,
        pooling="avg",
    )


def _check_alpha(alpha: float) -> None:
    problem = check_alpha(alpha)
    if problem:
        raise UsageError(f"--alpha {alpha} {problem}")


WeightsKey = Tuple[str, Optional[float], int, int]


def weights_key(source: str, alpha: Optional[float] = None) -> WeightsKey:
    """``(source, alpha, mtime_ns, size)``: the key of every memo of a driver that depends on
    the weights, so a weights file replaced at the same path is read again."""
    path = BUNDLED_WEIGHTS if source == "bundled" else Path(source).expanduser()
    try:
        st = path.stat()
        return source, alpha, st.st_mtime_ns, st.st_size
    except OSError:  # imagenet, random:SEED
        return source, alpha, 0, 0


# weights_key -> (spec, weights): a second job in the same driver (a warm run; `fruits-pipeline
# run` in a notebook) skips the Keras build and h5 read.
_RESOLVED: Dict[WeightsKey, Tuple[ModelSpec, List[np.ndarray]]] = {}


def resolve_weights(
    source: str, alpha: Optional[float] = None
) -> Tuple[ModelSpec, List[np.ndarray]]:
    """Load the weights on the driver, once per driver process (see :func:`_load_weights`)."""
    key = weights_key(source, alpha)
    if key not in _RESOLVED:
        _RESOLVED.clear()  # hold one set of weights at a time
        _RESOLVED[key] = _load_weights(source, alpha)
    return _RESOLVED[key]


def _load_weights(source: str, alpha: Optional[float] = None) -> Tuple[ModelSpec, List[np.ndarray]]:
    """Load the weights on the driver.

    Parameters
    ----------
    source : str
        ``imagenet`` (Keras download, alpha 1.0 by default), ``bundled`` (the
        project's alpha-0.35 ImageNet file), ``random:SEED`` or a path to a Keras
        ``.h5`` weights file of MobileNetV2 without its top.
    alpha : float, optional
        Width multiplier; default 0.35 for ``bundled``, 1.0 otherwise.

    Returns
    -------
    spec : ModelSpec
    weights : list of ndarray
        In ``model.get_weights()`` order.

    Raises
    ------
    UsageError
        Unknown source, missing or unreadable file, failed download.
    """
    m = _RANDOM.match(source)
    if source == "bundled":
        if alpha not in (None, BUNDLED_ALPHA):
            raise UsageError(
                f"--weights bundled is MobileNetV2 alpha {BUNDLED_ALPHA}, not {alpha}: drop --alpha"
            )
        alpha = BUNDLED_ALPHA
        path: Optional[Path] = BUNDLED_WEIGHTS
        label = "bundled:" + BUNDLED_WEIGHTS.name
    elif source == "imagenet":
        alpha = 1.0 if alpha is None else alpha
        if alpha not in IMAGENET_ALPHAS:
            raise UsageError(
                f"--alpha {alpha} has no ImageNet weights: use one of "
                + ", ".join(map(str, IMAGENET_ALPHAS))
            )
        path, label = None, "imagenet"
    elif m:
        alpha = 1.0 if alpha is None else alpha
        path, label = None, source
    elif source.endswith((".h5", ".hdf5", ".keras", ".weights.h5")) or os.sep in source:
        alpha = 1.0 if alpha is None else alpha
        path = Path(source).expanduser()
        if not path.is_file():
            raise UsageError(
                f"weights file {source} does not exist: give a readable Keras .h5 file"
            )
        label = "file:" + str(path.resolve())
    else:
        raise UsageError(
            f"unknown --weights {source!r}: use imagenet, bundled, random:SEED "
            "or the path of a Keras MobileNetV2 .h5 weights file"
        )
    _check_alpha(alpha)

    if m:
        import tensorflow as tf

        tf.keras.utils.set_random_seed(int(m.group(1)))
        model = build_model(alpha, None)
    elif path is not None:
        try:
            model = build_model(alpha, str(path))
        except Exception as exc:  # h5py/Keras raise many types for a bad file
            raise UsageError(
                f"cannot load weights {path} into MobileNetV2 alpha={alpha} without top "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                "check the file, or pass the --alpha it was made for"
            ) from None
    else:
        try:
            model = build_model(alpha, "imagenet")
        except Exception as exc:
            raise UsageError(
                f"could not get Keras' ImageNet weights for alpha={alpha} ({type(exc).__name__}); "
                "they are downloaded on the driver: check the network, or use --weights bundled "
                "or a local .h5 file"
            ) from None
    weights = [np.asarray(w) for w in model.get_weights()]
    spec = ModelSpec(
        alpha=float(alpha),
        weights_source=label,
        weights_sha256=weights_sha256(weights),
        # 1280 up to alpha 1.0, 1280 x alpha above (1664 at 1.3, 1792 at 1.4).
        feature_dim=int(model.output_shape[-1]),
        versions=library_versions(),
    )
    return spec, weights


# ---------------------------------------------------------------- executor side


def _configure_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        # TensorFlow already started in this process: keep its settings.
        pass


def keras_featurizer(weights: List[np.ndarray], alpha: float, threads: int):
    _configure_threads(threads)
    import tensorflow as tf

    model = build_model(alpha, None)
    model.set_weights(weights)

    # A compiled graph: eager model(x) ran at half its speed on 2 cores (134 vs 216 img/s).
    @tf.function(
        input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)],
        reduce_retracing=True,
    )
    def infer(x):
        return model(x, training=False)

    def featurize(x: np.ndarray) -> np.ndarray:
        return infer(tf.constant(x)).numpy()

    return featurize


def local_featurizer(weights: List[np.ndarray], alpha: float) -> Callable[[np.ndarray], np.ndarray]:
    """The same compiled featurizer in this process (benchmarks and the Python API)."""
    return keras_featurizer(weights, alpha, threads=0)
