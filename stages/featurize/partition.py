"""Stage 1 on the executors: one partition of ``binaryFile`` rows to feature rows.

Runs in the Python worker: decodes each image (an undecodable one becomes an error row
with its reason), preprocesses, runs the batch featurizer of this worker (built once from
the broadcast model, :func:`stages.featurize.engine.get_featurizer`) and yields Arrow
batches of ``path, label, features, error, thumb`` (+ ``length``/``modificationTime`` when
asked).  ``thumb`` is made here, from the bytes in hand: the photo is read once in the
pipeline's life (the search index and the app take the thumbnail from the features).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, List, Optional
from urllib.parse import unquote

import numpy as np

from stages.base.contract import THUMB_PX, features_schema
from stages.featurize.engine import get_featurizer
from stages.featurize.images import DecodeError, decode_image, preprocess, thumbnail_jpeg


def image_thumbnail(content: Optional[bytes]) -> Optional[bytes]:
    """The ``thumb`` of a row: a JPEG of at most :data:`THUMB_PX` pixels a side, made from
    the bytes the worker holds for the decode; ``None`` when they are not an image."""
    return thumbnail_jpeg(content, THUMB_PX, quality=80)


def label_from_path(path: str, url_encoded: bool = False) -> str:
    """The parent folder's name of ``path``, exactly as on disk.

    Parameters
    ----------
    path : str
        A file URI as Spark's ``binaryFile`` gives it.
    url_encoded : bool
        Whether this Spark/filesystem gives paths percent-encoded
        (``Apple%20Braeburn``); decided once per job by :func:`paths_are_url_encoded`.
    """
    parts = path.rstrip("/").split("/")
    label = parts[-2] if len(parts) >= 2 else ""
    return unquote(label) if url_encoded else label


def featurize_partition(
    batches: Iterable[Any],
    broadcast_model,
    model_key: str,
    alpha: float,
    batch_size: int,
    url_encoded: bool,
    engine: str = "keras",
    builds=None,
    pids=None,
    counts=None,
    schema=None,
    jpeg_draft: int = 0,
    exif_orientation: bool = True,
    to_paths=None,
) -> Iterator[Any]:
    """Featurize one partition of Arrow batches of ``(path, content)``, in model batches.

    Runs on the executors (``mapInArrow``).  Each output batch holds one model
    batch's rows, features as one float32 buffer (no Python object per float).  A
    row that cannot be decoded gets its reason in ``error`` and null features; the
    model is only built if a row decodes.  ``counts``, a pair of accumulators,
    receives the rows and the error rows.  ``to_paths`` maps the scanned paths to the
    ones written (a local INPUT is scanned through a view of symlinks).
    """
    import pyarrow as pa
    from pyspark import TaskContext

    if schema is None:
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(features_schema())
    list_type = schema.field("features").type
    ctx = TaskContext.get()
    threads = max(1, ctx.cpus()) if ctx is not None else 1
    featurizer = None
    seen = bad = 0

    def model_batch(paths, contents):
        nonlocal featurizer, bad
        labels = [label_from_path(p, url_encoded) for p in paths]
        errors: List[Optional[str]] = [None] * len(paths)
        thumbs: List[Optional[bytes]] = [None] * len(paths)
        arrays = []
        for i, content in enumerate(contents):
            try:
                arrays.append(
                    decode_image(content, exif_orientation=exif_orientation, draft=jpeg_draft)
                )
            except DecodeError as exc:
                errors[i] = str(exc)
                continue
            thumbs[i] = image_thumbnail(content)
        ok = np.array([e is None for e in errors], dtype=bool)
        if arrays:
            if featurizer is None:
                on_build = (lambda: builds.add(1)) if builds is not None else None
                featurizer = get_featurizer(
                    broadcast_model, model_key, alpha, threads, on_build, engine
                )
                if pids is not None:
                    pids.add({os.getpid()})
            feats = np.asarray(featurizer(preprocess(np.stack(arrays))), dtype=np.float32)
            finite = np.isfinite(feats).all(axis=1)
            decoded = np.flatnonzero(ok)
            for i in decoded[~finite]:
                errors[i] = "model output is not finite"
            ok[decoded[~finite]] = False
            feats = feats[finite]
        else:
            feats = np.zeros((0, 0), np.float32)
        bad += int((~ok).sum())
        # The model's own width: 1280 up to alpha 1.0, more above (1792 at 1.4).
        offsets = np.zeros(len(paths) + 1, np.int32)
        offsets[1:] = np.cumsum(ok) * feats.shape[1]
        features = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(feats.ravel()), type=list_type, mask=pa.array(~ok)
        )
        columns = [pa.array(paths, pa.string()), pa.array(labels, pa.string())]
        thumbs = [t if e is None else None for t, e in zip(thumbs, errors)]
        columns += [features, pa.array(errors, pa.string()), pa.array(thumbs, pa.binary())]
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    for batch in batches:
        paths = batch.column(0).to_pylist()
        if to_paths is not None:
            paths = to_paths(paths)
        contents = batch.column(1)
        seen += len(paths)
        for i in range(0, len(paths), batch_size):
            yield model_batch(
                paths[i : i + batch_size],
                [c.as_py() for c in contents[i : i + batch_size]],
            )
    if counts is not None:
        # Added once the partition is fully written: the write is the job's only
        # stage, whose accumulator updates Spark applies once per partition.
        counts[0].add(seen)
        counts[1].add(bad)
