"""Linear algebra for the reduce stage.

``linalg.kernels`` holds pure numpy kernels over one block of rows (moments, the
Chan-Golub-LeVeque merge, covariance, correlation, eigendecomposition, projection);
they never import pyspark.  ``linalg.distributed`` applies them over an RDD of row
blocks with ``treeAggregate`` (``RowMatrix``, ``KeyedRowMatrix``).
"""

from linalg.kernels import (
    BlockMoments,
    PCAFit,
    block_moments,
    choose_k,
    correlation_from_covariance,
    covariance,
    eigh_descending,
    fit_pca_from_moments,
    merge_moments,
    project,
)

__all__ = [
    "BlockMoments",
    "PCAFit",
    "block_moments",
    "choose_k",
    "correlation_from_covariance",
    "covariance",
    "eigh_descending",
    "fit_pca_from_moments",
    "merge_moments",
    "project",
]
