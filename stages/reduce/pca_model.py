"""The fitted PCA (:meth:`stages.reduce.pca.PCA.fit`), saved in ``RESULTS/pca_model/``, and how
to use it on new features, DataFrames and photos.

``pca_model/arrays.npz`` holds ``mean``, ``std``, ``components`` (d x k),
``eigenvalues`` and ``explained_variance_ratio``, and ``m2``, the centred
cross-product (d x d, float64) that with ``n_samples`` and ``mean`` is the fit's
sufficient statistics (``reduce --update`` merges new rows into them);
``pca_model/model.json`` holds the scalars, what made the features (model, alpha,
weights source and SHA-256) and which feature files the statistics cover.

>>> from stages.reduce.pca_model import PCAModel
>>> model = PCAModel.load("demo-output/Results")              # doctest: +SKIP
>>> model.components_.shape                                   # doctest: +SKIP
(k, 1280)
>>> model.project_images(["photo.jpg"])                       # doctest: +SKIP
array([[...]])  # (1, k): featurized with the same weights, standardised, projected
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np

from linalg.kernels import BlockMoments, PCAFit, project
from stages.base.contract import model_identity, read_model_spec
from stages.base.errors import UsageError
from stages.reduce.feature_matrix import (
    DATAFRAME_NAME,
    check_features_schema,
    feature_rows,
    is_dataframe,
    projections_frame,
)
from stages.storage.fs import filesystem
from stages.storage.layout import ARRAYS, MODEL_DIR, MODEL_META

__all__ = ["PCAModel"]


@dataclass(frozen=True)
class PCAModel:
    """A fitted standardise-then-PCA: ``transform(X) = ((X - mean_) / scale_) @ components_.T``,
    with columns whose ``scale_`` is 0 (constant in the fitted rows) mapped to 0, as Spark
    ML's ``StandardScaler`` does.

    Made by :meth:`stages.reduce.pca.PCA.fit` (or :meth:`~stages.reduce.pca.PCA.fit_moments`), or
    :meth:`load`.  The scikit-learn attributes (``mean_``, ``scale_``, ``components_``,
    ``explained_variance_``, ``explained_variance_ratio_``, ``n_components_``,
    ``n_samples_``, ``n_features_in_``) are views of ``pca_fit``.

    Attributes
    ----------
    pca_fit : PCAFit
        The arrays as the kernels hold them (components as columns, all eigenvalues).
    features_model : dict
        What made the features (``stages.featurize.model.ModelSpec`` as a dict), or empty.
    m2 : ndarray of shape (n_features, n_features), optional
        Centred cross-product of the rows fitted: with ``pca_fit.n_samples`` and
        ``pca_fit.mean``, their exact moments.
    statistics : dict
        What those moments cover: ``files`` (the feature Parquet files, relative to
        the features folder),
        ``error_rows``, ``rows_total``, ``requested`` (``k`` / ``variance``).
    timings : dict
        Seconds of the fit that made this model (``moments``, ``eigh``); not saved.
    """

    pca_fit: PCAFit
    features_model: Dict[str, Any] = field(default_factory=dict)
    m2: Optional[np.ndarray] = None
    statistics: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def with_timings(self, timings: Dict[str, float]) -> PCAModel:
        """This model with ``timings`` set."""
        return replace(self, timings=dict(timings))

    # ------------------------------------------------- scikit-learn attributes

    @property
    def mean_(self) -> np.ndarray:
        """Column means of the fitted rows, shape (n_features,)."""
        return self.pca_fit.mean

    @property
    def scale_(self) -> np.ndarray:
        """Unbiased column standard deviations, shape (n_features,); 0 for a constant column."""
        return self.pca_fit.std

    @property
    def components_(self) -> np.ndarray:
        """Unit eigenvectors of the correlation matrix as rows, shape (n_components, n_features).

        Descending eigenvalues; each row's entry of largest ``|x|`` is positive.
        """
        return self.pca_fit.components.T

    @property
    def explained_variance_(self) -> np.ndarray:
        """Variance of the standardised rows along each component (ddof=1), shape (k,)."""
        return self.pca_fit.eigenvalues[: self.n_components_]

    @property
    def explained_variance_ratio_(self) -> np.ndarray:
        """Share of the total standardised variance of each component, shape (k,)."""
        return self.pca_fit.explained_variance_ratio[: self.n_components_]

    @property
    def n_components_(self) -> int:
        """k."""
        return self.pca_fit.n_components

    @property
    def n_samples_(self) -> int:
        """Rows fitted (error rows excluded)."""
        return self.pca_fit.n_samples

    @property
    def n_features_in_(self) -> int:
        """Feature length d."""
        return self.pca_fit.n_features

    @property
    def moments(self) -> Optional[BlockMoments]:
        """The saved sufficient statistics, if this model kept them."""
        if self.m2 is None:
            return None
        return BlockMoments(self.pca_fit.n_samples, self.pca_fit.mean, self.m2)

    def transform(self, X):
        """Project features: an array, or a features DataFrame on Spark.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features), or DataFrame
            A DataFrame needs the features columns ``path, label, features, error``
            (a features Parquet read with ``spark.read.parquet``); its error rows
            are skipped.

        Returns
        -------
        ndarray of shape (n_samples, n_components), float64, or DataFrame
            For a DataFrame: ``path, label, pca array<double>[k]``, the schema of
            ``RESULTS/projections/`` (lazy; the projection matrix is broadcast
            once and lives as long as the DataFrame's plan).

        Raises
        ------
        ValueError
            An array of the wrong shape (for a DataFrame: a task meeting a vector
            of another length fails).
        UsageError
            A DataFrame without the features schema, or made by another model.
        """

        if is_dataframe(X):
            return self._transform_frame(X)[0]
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.pca_fit.n_features:
            raise ValueError(
                f"X must have shape (n_samples, {self.pca_fit.n_features}), got {X.shape}"
            )
        return project(X, self.pca_fit.projection_matrix(), self.pca_fit.mean)

    def _transform_frame(self, df):
        check_features_schema(df, DATAFRAME_NAME)
        spec = read_model_spec(df.schema)
        if (
            self.features_model
            and spec
            and model_identity(spec) != model_identity(self.features_model)
        ):
            raise UsageError(
                "these features were made by another model than the one this PCA was "
                "fitted on: featurize them with the same --weights"
            )
        matrix, _ = feature_rows(df, self.pca_fit.n_features)
        projected = self.project_matrix(matrix)
        return projections_frame(df.sparkSession, projected), projected

    @contextlib.contextmanager
    def projected(self, df) -> Iterator[Any]:
        """``transform(df)`` for the length of a ``with`` block, whose broadcast is
        destroyed at its end (a stream projects one DataFrame per micro-batch: each
        would otherwise leave its broadcast and its driver-side file behind)."""
        frame, projected = self._transform_frame(df)
        with projected:
            yield frame

    def project_matrix(self, matrix):
        """``matrix`` (a :class:`linalg.distributed.RowMatrix` of features) projected (lazy).

        The projection (d x k) and the mean are broadcast once; the returned matrix
        owns the broadcast: use it in a ``with`` block to destroy it after its jobs.
        """
        return matrix.project(self.pca_fit.projection_matrix(), self.pca_fit.mean)

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
        from stages.featurize.engine import prepare_model
        from stages.featurize.litert import litert_featurizer
        from stages.featurize.model import local_featurizer

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
        from stages.featurize.images import decode_image, preprocess

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
            np.concatenate(feats) if feats else np.zeros((0, self.pca_fit.n_features))
        )

    # ------------------------------------------------------------------ storage

    def to_files(self) -> Dict[str, bytes]:
        """The two files of ``pca_model/``, by name."""
        buf = io.BytesIO()
        extra = {} if self.m2 is None else {"m2": self.m2}
        np.savez(
            buf,
            mean=self.pca_fit.mean,
            std=self.pca_fit.std,
            components=self.pca_fit.components,
            eigenvalues=self.pca_fit.eigenvalues,
            explained_variance_ratio=self.pca_fit.explained_variance_ratio,
            **extra,
        )
        meta = {
            "n_samples": self.pca_fit.n_samples,
            "n_features": self.pca_fit.n_features,
            "n_components": self.pca_fit.n_components,
            "standardize": "StandardScaler(withMean=True, withStd=True), unbiased std",
            "transform": "((x - mean) / std) @ components; columns with std == 0 map to 0",
            "features_model": self.features_model,
        }
        if self.statistics:
            meta["statistics"] = self.statistics
        return {ARRAYS: buf.getvalue(), MODEL_META: json.dumps(meta, indent=2).encode()}

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
        Hadoop URI when a SparkSession is given (:func:`stages.storage.fs.filesystem`)."""

        base = _model_dir(results)
        fs = filesystem(spark)
        return cls.from_files(
            fs.read_bytes(f"{base}/{ARRAYS}"), fs.read_bytes(f"{base}/{MODEL_META}")
        )

    def save(self, results: str, spark=None) -> str:
        """Write ``RESULTS/pca_model/`` (or into ``.../pca_model`` if given that): a local
        path, or any Hadoop URI when a SparkSession is given; returns its URI."""

        base = _model_dir(results)
        fs = filesystem(spark)
        for name, data in self.to_files().items():
            fs.write_bytes(f"{base}/{name}", data)
        return base


def _model_dir(results: Any) -> str:
    """``RESULTS/pca_model``, or ``results`` itself when it is a ``pca_model`` folder."""
    if not isinstance(results, (str, os.PathLike)):
        raise TypeError(
            f"expected the RESULTS path first, got {type(results).__name__}: "
            "PCAModel.save(path, spark=None) and PCAModel.load(path, spark=None)"
        )
    base = os.fspath(results).rstrip("/")
    return base if base.rsplit("/", 1)[-1] == MODEL_DIR else f"{base}/{MODEL_DIR}"
