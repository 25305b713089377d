"""The projections (and FEATURES' error rows) as the report holds them: bounded
whatever the number of rows.

The driver keeps the exact row count of each class, a sample of at most
:data:`SCATTER_POINTS` rows for the scatter (two components and a label each), and
the first few rows of each class by path with their ``thumb``; never a list of all
the rows. A local table is streamed through pyarrow in batches (peak memory: one
batch plus what is kept); through Spark, the executors count and choose, and only
the chosen rows reach the driver. FEATURES' error rows are read the same way
(:func:`error_rows_local`, :func:`error_rows_spark`): exact counts per class, and only
the first ``limit`` rows by path kept.

The sample is stratified and deterministic: :func:`quotas` gives each class at most
a common cap (smaller classes whole, so they stay visible), and inside a class the
rows with the smallest MD5 of their path are taken (Spark's ``md5`` and
``hashlib``'s agree, so both readers choose the same rows, on every run).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import numpy as np

from stages.base.arrow_rdd import read_batch, to_arrow_batches

__all__ = [
    "SCATTER_POINTS",
    "ProjectionRows",
    "error_rows_local",
    "error_rows_spark",
    "quotas",
    "read_local",
    "read_spark",
]

# The scatter's bound: more points add no information to a 1000-pixel figure, and
# matplotlib draws 20,000 in about a second.
SCATTER_POINTS = 20_000
# Rows read per local batch: a few MB with k = 50, whatever the table's size; thumbnails
# (about 3 kB a row) in smaller batches.
_BATCH_ROWS = 16_384
_THUMB_ROWS = 2_048
# pyarrow reads a whole column chunk (a row group's, up to ~128 MB as Spark writes them)
# unless it reads through a buffer: then a batch's pages at a time (measured: peak RSS
# 555 -> 205 MiB, 5.3 -> 0.9 s for the thumbs of 1M rows).
_READ_BUFFER = 1 << 20


@dataclass
class ProjectionRows:
    """What the report keeps of ``projections/``.

    Attributes
    ----------
    counts : dict
        Class -> its rows (exact, every row counted).
    labels : list of str
        The sample's labels, by class then sample key (at most the bound).
    pcs : ndarray of shape (len(labels), min(k, 2))
        The sample's first two components.
    firsts : dict
        Class -> its first paths (by path), for the thumbnails.
    thumbs : dict
        Path (of ``firsts``) -> its ``thumb`` bytes, None where the row has none.
    """

    counts: Dict[str, int]
    labels: List[str]
    pcs: np.ndarray
    firsts: Dict[str, List[str]] = field(default_factory=dict)
    thumbs: Dict[str, Optional[bytes]] = field(default_factory=dict)


def quotas(counts: Mapping[str, int], bound: int) -> Dict[str, int]:
    """Rows of each class in a sample of at most ``bound`` rows.

    Every class gets ``min(count, cap)`` with the largest common cap that fits;
    the rows left over (fewer than the capped classes) go one each to the first
    capped classes by name, so the sample holds exactly ``min(bound, rows)`` rows.
    """
    total = sum(counts.values())
    if total <= bound:
        return dict(counts)
    sizes = np.sort(np.fromiter(counts.values(), dtype=np.int64))
    # Rows taken with cap c: sum(min(count, c)); the largest c whose sum fits.
    lo, hi = 0, int(sizes[-1])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= bound:
            lo = mid
        else:
            hi = mid - 1
    out = {name: min(n, lo) for name, n in counts.items()}
    left = bound - sum(out.values())
    for name in sorted(n for n, c in counts.items() if c > lo)[:left]:
        out[name] += 1
    return out


def sample_key(path: str) -> str:
    """The order of a row inside its class's sample: Spark's ``md5(path)``."""
    return hashlib.md5(path.encode("utf-8")).hexdigest()


def _leading_components(head) -> np.ndarray:
    """An Arrow list column of equal-length rows as an (n, length) float64 array."""
    import pyarrow.compute as pc

    n = len(head)
    lengths = pc.min_max(pc.list_value_length(head)).as_py() if n else {"min": 0, "max": 0}
    if lengths["min"] != lengths["max"]:
        raise ValueError(f"pca arrays of {lengths['min']} to {lengths['max']} values")
    values = pc.list_flatten(head).to_numpy(zero_copy_only=False)
    # Every row has as many values (one fit): the flat buffer is (n, length).
    return np.asarray(values, dtype=np.float64).reshape(n, int(lengths["min"] or 0))


def _first_per_class(table, order: List[str], quota: Union[int, Mapping[str, int]]):
    """The first ``quota`` rows of each class of ``table`` (by ``order``), sorted by
    label then ``order``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    table = table.sort_by([("label", "ascending")] + [(c, "ascending") for c in order])
    labels = pc.dictionary_encode(table.column("label")).combine_chunks()
    codes = labels.indices.to_numpy()
    names = labels.dictionary.to_pylist()
    caps = np.array([quota if isinstance(quota, int) else quota.get(x, 0) for x in names])
    # Sorted by label: each class is one run of equal codes; a row's rank is its
    # distance from the start of its run.
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    rank = np.arange(codes.size) - np.repeat(starts, np.diff(np.r_[starts, codes.size]))
    return table.filter(pa.array(rank < caps[codes]))


def _firsts(table) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for path, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist()):
        out.setdefault(label, []).append(path)
    return out


def _thumbs(table, wanted: Dict[str, List[str]]) -> Dict[str, Optional[bytes]]:
    """Path -> thumb of the rows of ``table`` (``path, thumb``), for every wanted path."""
    found = dict(zip(table.column("path").to_pylist(), table.column("thumb").to_pylist()))
    return {p: found.get(p) for paths in wanted.values() for p in paths}


def _batches(
    files: List[str],
    columns: List[str],
    where: Optional[Set[Tuple[int, int]]] = None,
    rows: int = _BATCH_ROWS,
):
    """``(file number, row group, batch)`` of ``columns``, one batch at a time, file by file
    (no read-ahead: memory is one batch); ``where`` keeps only those row groups."""
    import pyarrow.parquet as pq

    for i, name in enumerate(files):
        pf = pq.ParquetFile(name, buffer_size=_READ_BUFFER, pre_buffer=False)
        for rg in range(pf.num_row_groups):
            if where is None or (i, rg) in where:
                for batch in pf.iter_batches(rows, row_groups=[rg], columns=columns):
                    yield i, rg, batch


def read_local(path: str, bound: int, per_class: int) -> ProjectionRows:
    """:class:`ProjectionRows` of a local projections folder, streamed with pyarrow.

    Three passes, each holding one batch and what it keeps: labels and paths (the
    counts and each class's first paths, with the row group each is in), then path,
    label and two components (the sample), then ``thumb`` in the row groups of the
    chosen paths only (thumbnails are most of the table's bytes).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet")  # its files: no _SUCCESS, no .crc
    files = sorted(dataset.files)
    counts: Counter = Counter()
    firsts = None
    for i, rg, batch in _batches(files, ["path", "label"]):
        for item in pc.value_counts(batch.column("label")).to_pylist():
            counts[item["values"]] += item["counts"]
        if per_class > 0:
            n = batch.num_rows  # each row's file and row group: where its thumb is
            part = pa.table({"path": batch.column("path"), "label": batch.column("label"),
                             "file": np.full(n, i, np.int32),
                             "rg": np.full(n, rg, np.int32)})  # fmt: skip
            part = part if firsts is None else pa.concat_tables([firsts, part])
            firsts = _first_per_class(part, ["path"], per_class)
    quota = quotas(counts, bound)
    kept = None
    for _, _, batch in _batches(files, ["path", "label", "pca"]):
        keys = pa.array([sample_key(p) for p in batch.column("path").to_pylist()], pa.string())
        head = pc.list_slice(batch.column("pca"), 0, 2, return_fixed_size_list=False)
        part = pa.table({"label": batch.column("label"), "key": keys,
                         "path": batch.column("path"), "head": head})  # fmt: skip
        part = part if kept is None else pa.concat_tables([kept, part])
        kept = _first_per_class(part, ["key", "path"], quota)
    chosen = _firsts(firsts) if firsts is not None else {}
    thumbs: Dict[str, Optional[bytes]] = {p: None for ps in chosen.values() for p in ps}
    if chosen and "thumb" in dataset.schema.names:
        wanted = pa.array(list(thumbs), pa.string())
        where = set(zip(firsts.column("file").to_pylist(), firsts.column("rg").to_pylist()))
        found = [
            pa.Table.from_batches([batch]).filter(pc.is_in(batch.column("path"), wanted))
            for _, _, batch in _batches(files, ["path", "thumb"], where, _THUMB_ROWS)
        ]
        thumbs = _thumbs(pa.concat_tables(found), chosen)
    return _rows(counts, kept, chosen, thumbs)


def _rows(counts, sample, firsts, thumbs) -> ProjectionRows:
    labels = [] if sample is None else sample.column("label").to_pylist()
    pcs = (
        np.zeros((0, 0))
        if sample is None
        else _leading_components(sample.column("head").combine_chunks())
    )
    return ProjectionRows(dict(sorted(counts.items())), labels, pcs, firsts, thumbs)


def _collect(df):
    """A small DataFrame on the driver as a ``pyarrow.Table`` (Arrow batches, no rows)."""
    import pyarrow as pa

    rdd, schema, _ = to_arrow_batches(df)
    return pa.Table.from_batches([read_batch(b, schema) for b in rdd.collect()], schema)


def read_spark(spark, uri: str, bound: int, per_class: int) -> ProjectionRows:
    """:class:`ProjectionRows` of a projections folder read by Spark: the executors count
    (``groupBy``) and choose (row numbers per class); the driver gets the chosen rows."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = spark.read.parquet(uri)
    counts = {r["label"]: int(r["count"]) for r in df.groupBy("label").count().collect()}
    quota = quotas(counts, bound)
    caps = F.create_map(*[F.lit(x) for item in quota.items() for x in item])
    by_key = Window.partitionBy("label").orderBy("key", "path")
    by_path = Window.partitionBy("label").orderBy("path")
    picked = (
        df.select("path", "label", F.slice("pca", 1, 2).alias("head"))
        .withColumn("key", F.md5("path"))
        .withColumn(
            "in_sample", F.row_number().over(by_key) <= F.coalesce(caps[F.col("label")], F.lit(0))
        )
        .withColumn("first", F.row_number().over(by_path) <= F.lit(per_class))
        .where("in_sample OR first")
    )
    table = _collect(picked) if counts else None
    sample = firsts = None
    if table is not None:
        sample = table.filter(table.column("in_sample")).sort_by(
            [("label", "ascending"), ("key", "ascending"), ("path", "ascending")]
        )
        firsts = table.filter(table.column("first")).sort_by(
            [("label", "ascending"), ("path", "ascending")]
        )
    chosen = _firsts(firsts) if firsts is not None and per_class > 0 else {}
    thumbs: Dict[str, Optional[bytes]] = {p: None for ps in chosen.values() for p in ps}
    if chosen and "thumb" in df.columns:
        wanted = df.where(F.col("path").isin(list(thumbs))).select("path", "thumb")
        thumbs = _thumbs(_collect(wanted), chosen)
    return _rows(counts, sample, chosen, thumbs)


ErrorRows = Tuple[List[Tuple[str, str, str]], Dict[str, int]]


def _first_by_path(parts: Iterable, limit: int):
    """The first ``limit`` rows of the tables ``parts`` by path; the sort is stable, so
    equal paths keep the order they were read in, as one sort of the whole table would."""
    import pyarrow as pa

    return pa.concat_tables(parts).sort_by("path").slice(0, limit)


def _with_errors(files: List[str]) -> Set[Tuple[int, int]]:
    """``(file number, row group)`` of the row groups whose ``error`` column may hold a
    value: one whose statistics say every value is null (most of them) is not read."""
    import pyarrow.parquet as pq

    out = set()
    for i, name in enumerate(files):
        meta = pq.read_metadata(name)
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            stats = [
                group.column(j).statistics
                for j in range(group.num_columns)
                if group.column(j).path_in_schema == "error"
            ]
            empty = (
                stats
                and stats[0] is not None
                and stats[0].has_null_count
                and stats[0].null_count == group.num_rows
            )
            if not empty:  # no statistics, or no such column (the read then says so)
                out.add((i, rg))
    return out


def error_rows_local(path: str, limit: int, rows: int = _BATCH_ROWS) -> ErrorRows:
    """FEATURES' error rows, streamed with pyarrow: the first ``limit`` by path, and the
    error rows per class (exact).

    Batches of at most ``rows`` rows of ``path, label, error``, from the row groups that
    may hold an error only; the driver holds one batch and the ``limit`` rows kept, however
    many error rows the table has.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet")  # pq.read_table's files: no _runs, no .crc
    files = sorted(dataset.files)
    counts: Counter = Counter()
    kept = None
    columns = ["path", "label", "error"]
    for _, _, batch in _batches(files, columns, _with_errors(files), rows):
        errors = batch.filter(pc.is_valid(batch.column("error")))
        if errors.num_rows == 0:
            continue
        for item in pc.value_counts(errors.column("label")).to_pylist():
            counts[item["values"]] += item["counts"]
        part = pa.Table.from_batches([errors])
        kept = _first_by_path([part] if kept is None else [kept, part], limit)
    if kept is None:
        return [], {}
    cols = [kept.column(c).to_pylist() for c in columns]
    return list(zip(*cols)), dict(counts)


def error_rows_spark(spark, uri: str, limit: int) -> ErrorRows:
    """:func:`error_rows_local` through Spark: the executors count the error rows per class
    (``groupBy``) and take the first ``limit`` by path; only those reach the driver."""
    from pyspark.sql import functions as F

    errors = spark.read.parquet(uri).where(F.col("error").isNotNull())
    counts = {r["label"]: int(r["count"]) for r in errors.groupBy("label").count().collect()}
    if not counts:
        return [], {}
    first = _collect(errors.select("path", "label", "error").orderBy("path").limit(limit))
    cols = [first.column(c).to_pylist() for c in ("path", "label", "error")]
    return list(zip(*cols)), counts
