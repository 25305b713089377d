"""The features contract, shared by every stage: columns, schema and metadata key.

Stage 1 writes it (:mod:`stages.featurize.frame`, :mod:`stages.featurize.incremental`,
:mod:`stages.watch`), stage 2 and the app read it (:mod:`stages.reduce.full`,
:mod:`stages.search.query`); importing it pulls in neither Pillow nor a model.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Optional, Tuple

__all__ = [
    "IMAGE_GLOB",
    "IMAGE_NAME",
    "METADATA_KEY",
    "THUMB_PX",
    "features_schema",
    "footer_model_spec",
    "model_identity",
    "read_model_spec",
]

# Hadoop glob: .jpg and .jpeg in any case.
IMAGE_GLOB = "*.{[jJ][pP][gG],[jJ][pP][eE][gG]}"
# The same rule for a file name (an S3 key, an event, a local walk): .jpg/.jpeg, any case.
IMAGE_NAME = re.compile(r".*\.jpe?g\Z", re.IGNORECASE | re.DOTALL)
# The key of the model metadata on the ``features`` field (in every Parquet footer).
METADATA_KEY = "fruits_pipeline"
# The thumbnails' size (pixels, the longer side) kept in FEATURES and shown by the app.
THUMB_PX = 96


def features_schema(spec=None):
    """Spark schema of the features Parquet, with ``spec`` (a ``stages.featurize.model.ModelSpec``)
    as the metadata of ``features``.

    ``thumb`` is the image's JPEG thumbnail (at most :data:`THUMB_PX` pixels a side), made
    where the photo's bytes were read so that no later stage reads the photo again; null
    for an error row and in features made before it existed.
    """
    from pyspark.sql.types import (
        ArrayType,
        BinaryType,
        FloatType,
        StringType,
        StructField,
        StructType,
    )

    meta = {METADATA_KEY: spec.to_dict()} if spec is not None else {}
    return StructType(
        [
            StructField("path", StringType(), False),
            StructField("label", StringType(), False),
            StructField("features", ArrayType(FloatType(), containsNull=False), True, meta),
            StructField("error", StringType(), True),
            StructField("thumb", BinaryType(), True),
        ]
    )


def read_model_spec(schema) -> Optional[Dict[str, Any]]:
    """The model metadata stored on a features schema's ``features`` field, if any."""
    try:
        field_ = schema["features"]
    except KeyError:
        return None
    meta = field_.metadata.get(METADATA_KEY)
    if isinstance(meta, str):
        meta = json.loads(meta)
    return meta


# The footer key where Spark writes a Parquet file's schema (with field metadata) as JSON.
SPARK_SCHEMA_KEY = "org.apache.spark.sql.parquet.row.metadata"


def footer_model_spec(footer: Dict[str, str]) -> Optional[Dict[str, Any]]:
    """The model metadata a features file's Parquet footer records (the key-value
    metadata of :func:`stages.storage.hadoopfs.parquet_footer`), if any."""
    raw = footer.get(SPARK_SCHEMA_KEY)
    for f in json.loads(raw or "{}").get("fields", []):
        if f.get("name") == "features":
            meta = (f.get("metadata") or {}).get(METADATA_KEY)
            return json.loads(meta) if isinstance(meta, str) else meta
    return None


def model_identity(spec: Optional[Dict[str, Any]]) -> Optional[Tuple[Any, ...]]:
    """The fields of a :meth:`ModelSpec.to_dict` that make two feature sets comparable
    (not library versions); ``None`` for features that record no model."""
    if spec is None:
        return None
    return (
        spec.get("name"),
        float(spec.get("alpha", 0)),
        spec.get("input_size"),
        spec.get("pooling"),
        spec.get("weights_sha256"),
        bool(spec.get("exif_orientation", False)),  # older features: pixels as stored
        int(spec.get("jpeg_draft", 0)),
    )
