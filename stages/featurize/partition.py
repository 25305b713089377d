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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import unquote

import numpy as np

from stages.base.contract import THUMB_PX, features_schema
from stages.featurize.engine import get_featurizer
from stages.featurize.images import DecodeError, decode_photo, preprocess
from stages.storage.fetch import ReadError, StoreSettings, path_bytes_batches, requests_made
from stages.storage.s3list import delta


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


# Rows per Arrow batch between the JVM and the Python worker, at least: LiteRT's model
# batches are small (4), and each Arrow batch costs both sides a round of framing.
ARROW_BATCH_ROWS = 16


def arrow_batch_rows(batch_size: int) -> int:
    """Rows per Arrow batch for model batches of ``batch_size``: whole model batches,
    at least :data:`ARROW_BATCH_ROWS` (16 photos of 12 MP: ~80 MB of JPEG bytes)."""
    return batch_size * max(1, -(-ARROW_BATCH_ROWS // batch_size))


def binary_array(values: Sequence[Optional[bytes]]):
    """An Arrow ``binary`` array of ``values`` (None: null), built from its buffers (see
    :func:`string_array`)."""
    return _bytes_array([v for v in values], binary=True)


def string_array(values: Sequence[Optional[str]]):
    """An Arrow ``string`` array of ``values`` (None: null), built from its buffers.

    ``pa.array`` imports pandas on first use (to test for pandas objects): about a
    CPU-second per Python worker, for nothing.
    """
    return _bytes_array([None if v is None else v.encode() for v in values], binary=False)


def _bytes_array(encoded: Sequence[Optional[bytes]], binary: bool):
    import pyarrow as pa

    n = len(encoded)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum([0 if e is None else len(e) for e in encoded], out=offsets[1:])
    valid = np.fromiter((e is not None for e in encoded), bool, n)
    nulls = n - int(np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    data = b"".join(e for e in encoded if e is not None)
    buffers = [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)]
    kind = pa.binary() if binary else pa.string()
    return pa.Array.from_buffers(kind, n, buffers, null_count=nulls)


def features_array(feats: np.ndarray, ok: np.ndarray, list_type):
    """The ``features`` column: row ``i`` the next row of ``feats`` where ``ok[i]``, else null.

    ``feats`` (float32, one row per true ``ok``) becomes the values buffer as it is:
    no copy, no Python object per float.
    """
    import pyarrow as pa

    n, width = len(ok), (feats.shape[1] if feats.ndim == 2 else 0)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(ok, out=offsets[1:])
    offsets *= width
    values = np.ascontiguousarray(feats, dtype=np.float32).reshape(-1)
    child = pa.Array.from_buffers(pa.float32(), len(values), [None, pa.py_buffer(values)])
    nulls = n - int(np.count_nonzero(ok))
    bitmap = pa.py_buffer(np.packbits(ok, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(
        list_type, n, [bitmap, pa.py_buffer(offsets)], null_count=nulls, children=[child]
    )


def decode_rows(
    contents: Sequence[Any], exif_orientation: bool = True, jpeg_draft: int = 0
) -> Tuple[List[np.ndarray], List[Optional[str]], List[Optional[bytes]]]:
    """Decode photos' bytes (or the :class:`ReadError` of one that could not be read):
    the arrays of those that decode, each row's error and each row's ``thumb`` (made
    from the same decode: :data:`THUMB_PX` a side at most)."""
    errors: List[Optional[str]] = [None] * len(contents)
    thumbs: List[Optional[bytes]] = [None] * len(contents)
    arrays = []
    for i, content in enumerate(contents):
        if isinstance(content, ReadError):  # the photo could not be read (fetch)
            errors[i] = str(content)
            continue
        try:
            arr, thumbs[i] = decode_photo(
                content, exif_orientation=exif_orientation, draft=jpeg_draft, thumb_px=THUMB_PX
            )
        except DecodeError as exc:
            errors[i] = str(exc)
            continue
        arrays.append(arr)
    return arrays, errors, thumbs


@dataclass(frozen=True)
class PartitionJob:
    """What each task of a featurize job gets (pickled with the task).

    ``model``: the broadcast payload, built into this worker's featurizer under
    ``model_key`` (:func:`stages.featurize.engine.get_featurizer`); ``url_encoded``: see
    :func:`label_from_path`; ``schema``: the output's Arrow schema (the plain
    :func:`features_schema` when ``None``).  ``to_paths`` maps the scanned paths to the
    ones written (a local INPUT's rows are the photos' numbers).  With ``fetch``,
    the batches carry paths only and the worker reads the bytes itself, many requests in
    flight (:func:`stages.storage.fetch.path_bytes_batches`).

    Accumulators, each optional: ``builds`` (models built), ``pids`` (the workers that
    ran), ``counts`` (a pair: rows and error rows), ``requests`` (the S3 requests made,
    by kind).
    """

    model: Any
    model_key: str
    alpha: float
    batch_size: int
    url_encoded: bool
    engine: str = "keras"
    jpeg_draft: int = 0
    exif_orientation: bool = True
    schema: Any = None
    to_paths: Optional[Callable[[Sequence[str]], Sequence[str]]] = None
    fetch: Optional[StoreSettings] = None
    builds: Any = None
    pids: Any = None
    counts: Any = None
    requests: Any = None


def featurize_partition(batches: Iterable[Any], job: PartitionJob) -> Iterator[Any]:
    """Featurize one partition of Arrow batches of ``(path, content)``, in model batches.

    Runs on the executors (``mapInArrow``).  Each output batch holds one input
    batch's rows (the model runs on ``job.batch_size`` of them at a time), features as
    one float32 buffer (no Python object per float).  A row that cannot be decoded
    gets its reason in ``error`` and null features; the model is only built if a
    row decodes.
    """
    import pyarrow as pa
    from pyspark import TaskContext

    schema = job.schema
    if schema is None:
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(features_schema())
    list_type = schema.field("features").type
    ctx = TaskContext.get()
    threads = max(1, ctx.cpus()) if ctx is not None else 1
    featurizer = None
    seen = bad = 0

    def infer(arrays: List[np.ndarray]) -> np.ndarray:
        """Features of decoded photos, in model batches of ``batch_size``."""
        nonlocal featurizer
        if featurizer is None:
            on_build = (lambda: job.builds.add(1)) if job.builds is not None else None
            featurizer = get_featurizer(
                job.model, job.model_key, job.alpha, threads, on_build, job.engine
            )
            if job.pids is not None:
                job.pids.add({os.getpid()})
        size = job.batch_size
        parts = [
            featurizer(preprocess(np.stack(arrays[i : i + size])))
            for i in range(0, len(arrays), size)
        ]
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def output_batch(paths, contents):
        nonlocal bad
        labels = [label_from_path(p, job.url_encoded) for p in paths]
        # The photo's thumbnail is made here, from its decode: it is never read again.
        arrays, errors, thumbs = decode_rows(contents, job.exif_orientation, job.jpeg_draft)
        ok = np.array([e is None for e in errors], dtype=bool)
        if arrays:
            feats = np.asarray(infer(arrays), dtype=np.float32)
            finite = np.isfinite(feats).all(axis=1)
            if not finite.all():
                decoded = np.flatnonzero(ok)
                for i in decoded[~finite]:
                    errors[i] = "model output is not finite"
                ok[decoded[~finite]] = False
                feats = feats[finite]
        else:
            feats = np.zeros((0, 0), np.float32)
        bad += int((~ok).sum())
        columns = [string_array(paths), string_array(labels)]
        columns += [features_array(feats, ok, list_type), string_array(errors)]
        thumbs = [t if e is None else None for t, e in zip(thumbs, errors)]
        columns.append(binary_array(thumbs))
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    fetch, requests, counts = job.fetch, job.requests, job.counts
    before = requests_made(fetch) if requests is not None else None
    # One output batch per input batch (arrow_batch_rows(batch_size) rows): fewer Arrow
    # batches for the JVM to read than one per model batch.
    rows = arrow_batch_rows(job.batch_size)
    read = path_bytes_batches(batches, rows, fetch, job.to_paths, job.url_encoded)
    for paths, contents in read:
        seen += len(paths)
        yield output_batch(paths, contents)
    if before is not None:
        requests.add(delta(before, requests_made(fetch)))
    if counts is not None:
        # Added once the partition is fully written: the write is the job's only
        # stage, whose accumulator updates Spark applies once per partition.
        counts[0].add(seen)
        counts[1].add(bad)
