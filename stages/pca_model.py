"""The fitted PCA saved in ``RESULTS/pca_model/``, and how to use it on new photos.

``pca_model/arrays.npz`` holds ``mean``, ``std``, ``components`` (d x k),
``eigenvalues`` and ``explained_variance_ratio``, and ``m2``, the centred
cross-product (d x d, float64) that with ``n_samples`` and ``mean`` is the fit's
sufficient statistics (``reduce --update`` merges new rows into them);
``pca_model/model.json`` holds the scalars, what made the features (model, alpha,
weights source and SHA-256) and which feature files the statistics cover.

>>> from stages.pca_model import PCAModel
>>> model = PCAModel.load("demo-output/Results")              # doctest: +SKIP
>>> model.project_images(["photo.jpg"])                       # doctest: +SKIP
array([[...]])  # (1, k): featurized with the same weights, standardised, projected
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import numpy as np

from linalg.kernels import BlockMoments, PCAFit, project

__all__ = ["PCAModel"]

ARRAYS = "arrays.npz"
META = "model.json"


@dataclass(frozen=True)
class PCAModel:
    """A standardise-then-project model: ``transform(X) = ((X - mean) / std) @ components``.

    Attributes
    ----------
    fit : PCAFit
    features_model : dict
        What made the features (``stages.model.ModelSpec`` as a dict), or empty.
    m2 : ndarray of shape (n_features, n_features), optional
        Centred cross-product of the rows fitted: with ``fit.n_samples`` and
        ``fit.mean``, their exact moments.
    statistics : dict
        What those moments cover: ``files`` (the feature Parquet files, relative to
        the features folder),
        ``error_rows``, ``rows_total``, ``requested`` (``k`` / ``variance``).
    """

    fit: PCAFit
    features_model: Dict[str, Any] = field(default_factory=dict)
    m2: Optional[np.ndarray] = None
    statistics: Dict[str, Any] = field(default_factory=dict)

    @property
    def moments(self) -> Optional[BlockMoments]:
        """The saved sufficient statistics, if this model kept them."""
        if self.m2 is None:
            return None
        return BlockMoments(self.fit.n_samples, self.fit.mean, self.m2)

    @property
    def n_components(self) -> int:
        """k."""
        return self.fit.n_components

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project features (n_samples, d) to (n_samples, k), float64."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.fit.n_features:
            raise ValueError(f"X must have shape (n_samples, {self.fit.n_features}), got {X.shape}")
        return project(X, self.fit.projection_matrix(), self.fit.mean)

    def featurizer(self):
        """The MobileNetV2 that made the features (same engine), built in this process.

        The weights are resolved again and checked against the SHA-256 and alpha
        recorded in the model.

        Returns
        -------
        callable
            ``f(x)``: preprocessed float32 (n, 224, 224, 3) to float32 (n, 1280).

        Raises
        ------
        ValueError
            If the model records nothing, or the weights no longer match.
        """
        from stages.engine import litert_featurizer, prepare_model
        from stages.model import local_featurizer

        spec = self.features_model
        if not spec:
            raise ValueError("this model does not record what made its features")
        source = spec["weights_source"]
        if source.startswith("bundled:"):
            source = "bundled"
        elif source.startswith("file:"):
            source = source[len("file:") :]
        # The engine that made the features (older features: Keras).
        engine = spec.get("engine", "keras")
        got, payload = prepare_model(source, spec["alpha"], engine)
        if got.weights_sha256 != spec["weights_sha256"] or float(got.alpha) != float(spec["alpha"]):
            raise ValueError(
                f"weights {source} (alpha {got.alpha}) are not the ones that made the features "
                f"(sha256 {got.weights_sha256[:12]} != {spec['weights_sha256'][:12]}, "
                f"alpha {spec['alpha']})"
            )
        if engine == "litert":
            return litert_featurizer(payload, threads=os.cpu_count() or 1)
        return local_featurizer(payload, got.alpha)

    def project_images(self, paths: Iterable[str], batch_size: int = 64) -> np.ndarray:
        """Featurize local image files with the same model and decode, then project them.

        Raises
        ------
        ValueError
            If an image cannot be decoded, or the weights no longer match.
        """
        from stages.images import decode_image, preprocess

        featurize = self.featurizer()
        spec = self.features_model
        images = []
        for p in paths:
            with open(p, "rb") as fh:
                images.append(
                    decode_image(  # the decode that made the features
                        fh.read(),
                        exif_orientation=spec.get("exif_orientation", False),
                        draft=int(spec.get("jpeg_draft", 0)),
                    )
                )
        feats = [
            featurize(preprocess(np.stack(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
        return self.transform(
            np.concatenate(feats) if feats else np.zeros((0, self.fit.n_features))
        )

    # ------------------------------------------------------------------ storage

    def to_files(self) -> Dict[str, bytes]:
        """The two files of ``pca_model/``, by name."""
        buf = io.BytesIO()
        extra = {} if self.m2 is None else {"m2": self.m2}
        np.savez(
            buf,
            mean=self.fit.mean,
            std=self.fit.std,
            components=self.fit.components,
            eigenvalues=self.fit.eigenvalues,
            explained_variance_ratio=self.fit.explained_variance_ratio,
            **extra,
        )
        meta = {
            "n_samples": self.fit.n_samples,
            "n_features": self.fit.n_features,
            "n_components": self.fit.n_components,
            "standardize": "StandardScaler(withMean=True, withStd=True), unbiased std",
            "transform": "((x - mean) / std) @ components; columns with std == 0 map to 0",
            "features_model": self.features_model,
        }
        if self.statistics:
            meta["statistics"] = self.statistics
        return {ARRAYS: buf.getvalue(), META: json.dumps(meta, indent=2).encode()}

    @classmethod
    def from_files(cls, arrays: bytes, meta: bytes) -> PCAModel:
        """Rebuild from the bytes of ``arrays.npz`` and ``model.json``."""
        m = json.loads(meta)
        with np.load(io.BytesIO(arrays)) as z:
            fit = PCAFit(
                n_samples=int(m["n_samples"]),
                mean=z["mean"],
                std=z["std"],
                components=z["components"],
                eigenvalues=z["eigenvalues"],
                explained_variance_ratio=z["explained_variance_ratio"],
            )
            m2 = z["m2"] if "m2" in z.files else None
        return cls(fit, m.get("features_model") or {}, m2, m.get("statistics") or {})

    @classmethod
    def load(cls, results: str, spark=None) -> PCAModel:
        """Load from ``RESULTS`` (or ``RESULTS/pca_model``): a local path, or any
        Hadoop URI when a SparkSession is given (:func:`stages.fs.filesystem`)."""
        from stages.fs import filesystem

        base = results.rstrip("/")
        if not base.endswith("pca_model"):
            base = base + "/pca_model"
        fs = filesystem(spark)
        return cls.from_files(fs.read_bytes(f"{base}/{ARRAYS}"), fs.read_bytes(f"{base}/{META}"))

    def save(self, spark, results: str) -> str:
        """Write ``RESULTS/pca_model/`` (a local path, or any Hadoop URI); returns its URI."""
        from stages.fs import filesystem

        base = results.rstrip("/") + "/pca_model"
        fs = filesystem(spark)
        for name, data in self.to_files().items():
            fs.write_bytes(f"{base}/{name}", data)
        return base
