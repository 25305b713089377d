"""The shards of ``RESULTS/index/``: files written in parts, read memory-mapped.

A shard is one folder ``shards/<name>/`` of raw files, each readable with
``np.load(mmap_mode="r")`` or as bytes at an offset:

- ``vectors.npy``: float32 (m, k), the projections of its rows;
- ``labels.npy``: int32 (m,), codes into ``index.json``'s ``labels``;
- ``paths.bin`` + ``paths_offsets.npy`` (int64, m + 1): the UTF-8 paths, concatenated;
- ``thumbs.bin`` + ``thumbs_offsets.npy`` (int64, m + 1): the JPEG thumbnails,
  concatenated (a row without one has two equal offsets);
- ``keys.npy``: uint64 (m,), each row's :func:`path_keys`: a stable id of its photo, whatever
  the shard or position the row lands in (the open-set reference rows are chosen by it).

:class:`ShardWriter` streams a shard chunk by chunk into these files (the header of
a ``.npy`` is a fixed 128 bytes, written last), so a task holds one chunk at a time
and the files do not depend on the chunk size. :class:`ShardSet` opens the shards
listed in ``index.json`` and answers by global row id (the shards in their listed
order): vectors for a re-ranking, a path, a label, a thumbnail; nothing is read
until asked.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "NPY_HEADER",
    "ShardWriter",
    "ShardSet",
    "npy_header",
    "path_keys",
    "shard_bytes",
    "SHARD_FILES",
]

NPY_HEADER = 128  # bytes: room for any shape of up to two 19-digit numbers
SHARD_FILES = (
    "vectors.npy",
    "labels.npy",
    "paths.bin",
    "paths_offsets.npy",
    "thumbs.bin",
    "thumbs_offsets.npy",
    "keys.npy",
)


def path_keys(paths: Sequence[str]) -> np.ndarray:
    """The key of each path: the first 8 bytes of its UTF-8 BLAKE2b digest, as uint64 (little
    endian).  A function of the path alone, so the same photo has the same key in any shard,
    on any executor, in any Python (unlike ``hash``, salted per process)."""
    digests = b"".join(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest() for p in paths)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def npy_header(dtype: str, shape: Tuple[int, ...]) -> bytes:
    """A ``.npy`` version 1.0 header of exactly :data:`NPY_HEADER` bytes."""
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    body = text.encode("latin1")
    pad = NPY_HEADER - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER}-byte header")
    return (
        b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"
    )


class _Stream:
    """One file written beside its final name, renamed into place by :meth:`close`."""

    def __init__(self, path: str, header: bool) -> None:
        self.path = path
        self.temp = os.path.join(
            os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        )
        self.fh = open(self.temp, "xb")
        if header:
            self.fh.write(b"\0" * NPY_HEADER)

    def write(self, data) -> None:
        self.fh.write(data)

    def close(self, header: Optional[bytes] = None) -> None:
        if header is not None:
            self.fh.seek(0)
            self.fh.write(header)
        self.fh.close()
        os.replace(self.temp, self.path)

    def abort(self) -> None:
        self.fh.close()
        if os.path.exists(self.temp):
            os.unlink(self.temp)


class ShardWriter:
    """Write one shard folder chunk by chunk (see the module docstring).

    Parameters
    ----------
    folder : str
        A local folder (created); its files are replaced.
    dims : int
        The vectors' width k.
    """

    def __init__(self, folder: str, dims: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.dims = dims
        self.rows = 0
        self.missing = 0  # rows without a thumbnail
        self._path_end = 0
        self._thumb_end = 0
        self._s = {
            name: _Stream(os.path.join(folder, name), name.endswith(".npy")) for name in SHARD_FILES
        }
        for name in ("paths_offsets.npy", "thumbs_offsets.npy"):
            self._s[name].write(np.zeros(1, "<i8").tobytes())

    def add(
        self,
        vectors: np.ndarray,
        labels: np.ndarray,
        paths: Sequence[str],
        thumbs: Sequence[Optional[bytes]],
    ) -> None:
        """Append a chunk of rows: vectors (c, k), label codes (c,), paths, thumbnails."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        c = len(paths)
        if vectors.shape != (c, self.dims) or len(labels) != c or len(thumbs) != c:
            raise ValueError(f"a chunk of {c} rows with vectors {vectors.shape}")
        s = self._s
        s["vectors.npy"].write(vectors.tobytes())
        s["labels.npy"].write(np.asarray(labels, "<i4").tobytes())
        encoded = [p.encode("utf-8") for p in paths]
        s["paths.bin"].write(b"".join(encoded))
        ends = self._path_end + np.cumsum([len(p) for p in encoded], dtype=np.int64)
        s["paths_offsets.npy"].write(ends.astype("<i8").tobytes())
        self._path_end = int(ends[-1]) if c else self._path_end
        sizes = [0 if t is None else len(t) for t in thumbs]
        s["thumbs.bin"].write(b"".join(t for t in thumbs if t))
        ends = self._thumb_end + np.cumsum(sizes, dtype=np.int64)
        s["thumbs_offsets.npy"].write(ends.astype("<i8").tobytes())
        self._thumb_end = int(ends[-1]) if c else self._thumb_end
        self.missing += sum(1 for t in thumbs if not t)
        s["keys.npy"].write(path_keys(paths).astype("<u8").tobytes())
        self.rows += c

    def close(self) -> Dict[str, int]:
        """Finish the files (headers, renames); returns ``rows``, ``missing``, ``bytes``."""
        m = self.rows
        headers = {
            "vectors.npy": npy_header("<f4", (m, self.dims)),
            "labels.npy": npy_header("<i4", (m,)),
            "paths_offsets.npy": npy_header("<i8", (m + 1,)),
            "thumbs_offsets.npy": npy_header("<i8", (m + 1,)),
            "keys.npy": npy_header("<u8", (m,)),
        }
        for name, stream in self._s.items():
            stream.close(headers.get(name))
        return {"rows": m, "missing": self.missing, "bytes": shard_bytes(self.folder)}

    def abort(self) -> None:
        """Drop the unfinished files."""
        for stream in self._s.values():
            stream.abort()


def shard_bytes(folder: str) -> int:
    """The bytes of a shard's files (those present: a partial copy has fewer)."""
    paths = [os.path.join(folder, n) for n in SHARD_FILES]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


class _Shard:
    def __init__(self, folder: str) -> None:
        def load(name):
            return np.load(os.path.join(folder, name), mmap_mode="r")

        def raw(name):
            path = os.path.join(folder, name)
            if os.path.getsize(path) == 0:
                return np.zeros(0, np.uint8)
            return np.memmap(path, dtype=np.uint8, mode="r")

        self.vectors = load("vectors.npy")
        self.labels = load("labels.npy")
        self.path_offsets = load("paths_offsets.npy")
        self.paths = raw("paths.bin")
        self.thumb_offsets = load("thumbs_offsets.npy")
        self.thumbs = raw("thumbs.bin")
        self.keys = load("keys.npy")


class ShardSet:
    """The shards of an index, by global row id (read on demand, memory-mapped).

    Parameters
    ----------
    folder : str
        The local ``index/`` folder.
    shards : list of dict
        ``index.json``'s ``shards`` (``name``, ``rows``), in row order.
    labels : list of str
        ``index.json``'s ``labels`` (the codes' names).
    """

    def __init__(self, folder: str, shards: Sequence[Dict[str, Any]], labels: Sequence[str]):
        self._shards = [_Shard(os.path.join(folder, "shards", s["name"])) for s in shards]
        counts = [len(s.labels) for s in self._shards]
        if counts != [int(s["rows"]) for s in shards]:
            raise ValueError(f"{folder}: shard row counts {counts} differ from index.json")
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.label_names = list(labels)
        self.dims = int(self._shards[0].vectors.shape[1]) if self._shards else 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> Tuple[int, int]:
        return (len(self), self.dims)

    def _locate(self, row: int) -> Tuple[_Shard, int]:
        if not 0 <= row < len(self):
            raise IndexError(row)
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self._shards[s], row - int(self.starts[s])

    def blocks(self) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row id, vectors)`` of each shard (memory-mapped)."""
        for start, shard in zip(self.starts, self._shards):
            if len(shard.labels):
                yield int(start), shard.vectors

    def key_blocks(self, end: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row id, keys)`` of each shard (memory-mapped), of the rows before ``end``
        only when given."""
        end = len(self) if end is None else min(int(end), len(self))
        for start, shard in zip(self.starts, self._shards):
            if start < end and len(shard.keys):
                yield int(start), shard.keys[: end - int(start)]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (float32, (len(rows), k))."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dims), np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._shards[s].vectors[rows[sel] - self.starts[s]]
        return out

    def __getitem__(self, rows) -> np.ndarray:
        """``shards[rows]``: the vectors of an integer array of rows (as :meth:`take`)."""
        return self.take(np.atleast_1d(np.asarray(rows)))

    def path(self, row: int) -> str:
        shard, i = self._locate(row)
        a, b = int(shard.path_offsets[i]), int(shard.path_offsets[i + 1])
        return bytes(shard.paths[a:b]).decode("utf-8")

    def label(self, row: int) -> str:
        shard, i = self._locate(row)
        return self.label_names[int(shard.labels[i])]

    def thumbnail(self, row: int) -> Optional[bytes]:
        shard, i = self._locate(row)
        a, b = int(shard.thumb_offsets[i]), int(shard.thumb_offsets[i + 1])
        return bytes(shard.thumbs[a:b]) if b > a else None

    def label_counts(self) -> List[int]:
        """Rows per label code (a pass over the label files)."""
        counts = np.zeros(len(self.label_names), np.int64)
        for shard in self._shards:
            counts += np.bincount(shard.labels, minlength=len(self.label_names))
        return counts.tolist()
