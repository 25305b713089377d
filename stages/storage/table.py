"""The FEATURES table of a growing bucket: one folder per run, a manifest, atomic commits.

``FEATURES/run=<id>/`` holds a run's rows; ``FEATURES/_runs/<n>.json`` is its record,
written last (the commit); ``_staging/`` holds a run being written.  A reader takes the
runs that records name and that no later record removes.

Two writers (two ``--incremental`` runs, or one and ``watch``) never both commit what
they planned on the same table: record ``n`` is created only if absent, atomically
(:func:`stages.storage.claim.create_exclusive`), and ``n`` is one more than the records
the run was planned on.  A run that loses that race commits after the winner when their
photos do not overlap, and is refused (one line, its staging deleted) when they do.
Records of older versions are named ``<run id>.json``; they count all the same.
:class:`FeaturesTable` is the one place that opens, recovers, migrates and commits this
layout (``--incremental``, ``watch``, ``reduce --update``).
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple, Union

from stages.base.contract import features_schema, footer_model_spec, model_identity
from stages.base.errors import UsageError
from stages.storage import hadoopfs
from stages.storage.claim import create_exclusive

logger = logging.getLogger(__name__)


RUNS_DIR = "_runs"


STAGING_DIR = "_staging"


RUN_PREFIX = "run="


def new_run_id() -> str:
    """A run id that sorts by time: ``20261201T081858123Z-a1b2c3`` (UTC)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def incremental_schema(spec=None):
    """The features schema plus the image's ``length`` and ``modificationTime``."""
    from pyspark.sql.types import LongType, StructField, TimestampType

    schema = features_schema(spec)
    schema = schema.add(StructField("length", LongType(), True))
    return schema.add(StructField("modificationTime", TimestampType(), True))


@dataclass
class RunRecord:
    """A run's manifest record (``_runs/<n>.json``), created last: the commit.

    ``kind`` is ``featurize`` (``--incremental``: with ``changed``, ``pruned`` and
    ``carried``), ``watch`` (a micro-batch: with its ``query`` and ``batch``) or
    ``queue`` (photos announced by an SQS ``queue``);
    ``removes`` names the runs this one supersedes.  ``committed`` is set by
    :meth:`FeaturesTable.commit`.
    """

    run: str
    kind: str
    input: str
    started: str
    rows: int
    new: int
    errors: int
    model: Dict[str, Any]
    removes: List[str] = field(default_factory=list)
    changed: Optional[int] = None
    pruned: Optional[int] = None
    carried: Optional[int] = None
    query: Optional[str] = None
    batch: Optional[int] = None
    queue: Optional[str] = None  # the SQS queue of a ``queue`` run
    committed: Optional[str] = None
    # S3 requests by kind, up to the commit (its own PUT is not in).
    requests: Optional[Dict[str, int]] = None

    _ORDER = ("run", "kind", "input", "queue", "query", "batch", "started", "committed", "rows")
    _ORDER_MID = ("new",)
    _ORDER_END = ("changed", "pruned", "carried", "errors", "model", "removes", "requests")

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object of the record (fields that do not apply left out)."""
        values = {k: getattr(self, k) for k in self._ORDER + self._ORDER_MID + self._ORDER_END}
        return {k: v for k, v in values.items() if v is not None}


class FeaturesTable:
    """The ``FEATURES`` folder seen through its run manifest.

    Parameters
    ----------
    spark : SparkSession
    uri : str
        The features folder (local path or Hadoop URI).
    """

    def __init__(self, spark, uri: str):
        self.spark = spark
        self.uri = uri.rstrip("/")

    # ---------------------------------------------------------------- layout

    def run_uri(self, run: str) -> str:
        """Where run ``run``'s rows live once committed."""
        return f"{self.uri}/{RUN_PREFIX}{run}"

    def staging_uri(self, run: str) -> str:
        """Where run ``run``'s rows are written before the commit."""
        return f"{self.uri}/{STAGING_DIR}/{RUN_PREFIX}{run}"

    def record_uri(self, position: int) -> str:
        """The manifest record of the ``position``-th commit (1, 2, ...)."""
        return f"{self.uri}/{RUNS_DIR}/{position:08d}.json"

    def _record_names(self) -> List[str]:
        return [
            name
            for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, f"{self.uri}/{RUNS_DIR}")
            if not is_dir and name.endswith(".json") and not name.startswith(".")
        ]

    def head(self) -> int:
        """How many runs are committed: what a run planned now is based on (one LIST)."""
        return len(self._record_names())

    def _read_records(self, names: List[str]) -> List[Dict[str, Any]]:
        out = [
            json.loads(hadoopfs.read_text(self.spark, f"{self.uri}/{RUNS_DIR}/{name}"))
            for name in names
        ]
        return sorted(out, key=lambda r: r["run"])

    def records(self) -> List[Dict[str, Any]]:
        """The committed runs' records, oldest first."""
        return self._read_records(self._record_names())

    def records_after(self, base: int) -> Tuple[int, List[Dict[str, Any]]]:
        """The position of the last record, and the records committed after the first
        ``base`` ones."""
        after = {
            int(n[: -len(".json")]): n
            for n in self._record_names()
            if n[: -len(".json")].isdigit() and int(n[: -len(".json")]) > base
        }
        return max(after, default=base), self._read_records(list(after.values()))

    def live_runs(self, records: Optional[List[Dict[str, Any]]] = None) -> List[str]:
        """Runs whose rows are part of the table: committed and not superseded."""
        records = self.records() if records is None else records
        gone = {r for rec in records for r in rec.get("removes", [])}
        return [rec["run"] for rec in records if rec["run"] not in gone]

    def flat_files(self) -> List[str]:
        """Parquet files directly in the folder (a table made by a plain ``featurize``)."""
        return [
            f"{self.uri}/{name}"
            for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, self.uri)
            if not is_dir and name.endswith(".parquet") and not name.startswith(("_", "."))
        ]

    def data_files(self) -> List[str]:
        """Every Parquet file of the table (flat or in live run folders)."""
        return [u for u, _ in hadoopfs.list_files(self.spark, self.uri, ".parquet")]

    def model(self) -> Optional[Dict[str, Any]]:
        """What made the table's features: the last run's record, else a file footer."""
        for rec in reversed(self.records()):
            if rec.get("model"):
                return rec["model"]
        files = self.data_files()
        if not files:
            return None

        return footer_model_spec(hadoopfs.parquet_footer(self.spark, files[0]))

    # ---------------------------------------------------------------- commit

    def commit(self, record: Union[RunRecord, Dict[str, Any]], base: Optional[int] = None) -> int:
        """Steps 2 and 3 of the protocol for a run whose rows are in staging; ``base`` is
        :meth:`head` before the run read the table (now, if not given).  Returns the
        position of the record (the writer's next ``base``); raises :class:`UsageError`
        when another writer committed some of the same photos since: nothing is kept."""
        if isinstance(record, RunRecord):
            if record.committed is None:
                record.committed = now_iso()
            record = record.to_dict()
        base = self.head() if base is None else base
        staged = self.staging_uri(record["run"])
        if record.get("kind") != "migrate" and not hadoopfs.exists(self.spark, staged):
            # Another writer's recover() took it for the leftover of a killed run.
            raise UsageError(
                f"another run on {self.uri} deleted this run's rows before they were "
                "committed (two writers at once): nothing of this run was kept; run again"
            )
        text = json.dumps(record, indent=2)
        for _ in range(100):  # each turn, another writer committed: bounded by writers
            if create_exclusive(self.spark, self.record_uri(base + 1), text):
                self._finish(record)
                return base + 1
            last, newer = self.records_after(base)
            if self._overlaps(record, newer):
                hadoopfs.delete(self.spark, self.staging_uri(record["run"]))
                others = ", ".join(r["run"] for r in newer)
                raise UsageError(
                    f"another run committed to {self.uri} while this one was running (run "
                    f"{others}), with some of the same photos: nothing of this run was kept; "
                    "run again to featurize what is still missing (one writer at a time)"
                )
            base = last  # those are checked: try the next position
        raise OSError(f"could not commit to {self.uri}: it keeps changing")

    def _overlaps(self, record: Dict[str, Any], newer: List[Dict[str, Any]]) -> bool:
        """Whether runs committed since a run was planned touch what it writes."""
        if record.get("kind") == "migrate" or any(r.get("kind") == "migrate" for r in newer):
            return True
        if set(record.get("removes", [])) & {x for r in newer for x in r.get("removes", [])}:
            return True
        theirs = []
        for r in newer:  # their rows may still be in staging: the winner is finishing
            for uri in (self.run_uri(r["run"]), self.staging_uri(r["run"])):
                if hadoopfs.exists(self.spark, uri):
                    theirs.append(uri)
                    break
        if not theirs or not hadoopfs.exists(self.spark, self.staging_uri(record["run"])):
            return False
        ours = self.spark.read.parquet(self.staging_uri(record["run"])).select("path")
        other = self.spark.read.option("basePath", self.uri).parquet(*theirs).select("path")
        return bool(ours.join(other, "path", "left_semi").limit(1).count())

    def _finish(self, record: Dict[str, Any]) -> None:
        run = record["run"]
        if record.get("kind") == "migrate":
            for name in record["files"]:
                if hadoopfs.exists(self.spark, f"{self.uri}/{name}"):
                    hadoopfs.rename(self.spark, f"{self.uri}/{name}", f"{self.run_uri(run)}/{name}")
        staged = self.staging_uri(run)
        if hadoopfs.exists(self.spark, staged):
            final = self.run_uri(run)
            if not hadoopfs.exists(self.spark, final):
                if not hadoopfs.rename(self.spark, staged, final):
                    raise OSError(f"could not rename {staged} to {final}")
            else:  # an S3 rename that died half-way: move what is left, file by file
                for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, staged):
                    if not is_dir and not hadoopfs.exists(self.spark, f"{final}/{name}"):
                        hadoopfs.rename(self.spark, f"{staged}/{name}", f"{final}/{name}")
                hadoopfs.delete(self.spark, staged)
        for old in record.get("removes", []):
            if hadoopfs.delete(self.spark, self.run_uri(old)):
                logger.info(f"featurize: run {old} superseded by {run}: its folder is deleted")
        staging = f"{self.uri}/{STAGING_DIR}"
        if hadoopfs.exists(self.spark, staging) and not hadoopfs.list_dir(self.spark, staging):
            hadoopfs.delete(self.spark, staging)

    def open_for_append(self, spec) -> FeaturesTable:
        """Ready the table for a new run of the model ``spec`` (``--incremental`` and
        ``watch``): refuse a missing bucket, finish or roll back an interrupted commit,
        refuse features of another model, move a plain featurize's files into a run.

        Returns
        -------
        FeaturesTable
            ``self``.
        """
        if hadoopfs.bucket_missing(self.spark, self.uri):
            raise UsageError(f"the bucket of output {self.uri} does not exist: create it first")
        if hadoopfs.has_data(self.spark, self.uri):
            self.recover()
            if self.records() or self.flat_files():
                check_same_model(self.model(), spec, f"features {self.uri}")
            if self.flat_files():
                self.migrate_flat()
        return self

    def recover(self) -> None:
        """Roll committed runs forward and drop aborted ones (idempotent, cheap)."""
        records = self.records()
        committed = {r["run"] for r in records}
        for rec in records:
            pending = hadoopfs.exists(self.spark, self.staging_uri(rec["run"])) or any(
                hadoopfs.exists(self.spark, self.run_uri(o)) for o in rec.get("removes", [])
            )
            if rec.get("kind") == "migrate":
                pending = any(hadoopfs.exists(self.spark, f"{self.uri}/{n}") for n in rec["files"])
            if pending:
                logger.info(
                    f"featurize: finishing the commit of run {rec['run']} (a run died after it)"
                )
                self._finish(rec)
        for name, _dir, _, _ in hadoopfs.list_dir(self.spark, f"{self.uri}/{RUNS_DIR}"):
            if name.startswith(".") and name.endswith(".tmp"):  # a record never renamed in
                hadoopfs.delete(self.spark, f"{self.uri}/{RUNS_DIR}/{name}")
        for name, is_dir, _, _ in hadoopfs.list_dir(self.spark, f"{self.uri}/{STAGING_DIR}"):
            run = name[len(RUN_PREFIX) :] if name.startswith(RUN_PREFIX) else None
            if is_dir and run not in committed:
                logger.info(
                    f"featurize: deleting {STAGING_DIR}/{name}, left by a run that did not commit"
                )
                hadoopfs.delete(self.spark, f"{self.uri}/{STAGING_DIR}/{name}")

    def migrate_flat(self) -> Optional[str]:
        """Move a plain ``featurize`` output's files into a first run (no rewrite).

        The record, listing the files, is written first: a move that dies half-way
        is finished by :meth:`recover`.  Its rows have no ``length`` and
        ``modificationTime``: an image counts as changed when it is newer than
        those files.
        """
        files = self.flat_files()
        if not files:
            return None
        run = new_run_id()
        stamps = {n: m for n, d, _, m in hadoopfs.list_dir(self.spark, self.uri) if not d}
        names = [u.rsplit("/", 1)[1] for u in files]
        record = {
            "run": run,
            "kind": "migrate",
            "started": now_iso(),
            "committed": now_iso(),
            "rows": self._count_flat(files),
            "files": names,
            "written_ms": max(stamps.get(n, 0) for n in names),
            "model": self.model(),
            "removes": [],
        }
        self.commit(record)
        hadoopfs.delete(self.spark, f"{self.uri}/_SUCCESS")
        logger.info(f"featurize: {len(files)} files of a plain featurize moved into run {run}")
        return run

    def _count_flat(self, files: List[str]) -> int:
        try:
            return int(self.spark.read.parquet(*files).count())
        except Exception:
            if all(hadoopfs.exists(self.spark, f) for f in files):
                raise
            raise UsageError(
                f"another run moved the files of {self.uri} into its first run while this one "
                "was reading them (two writers at once): run again once it has finished"
            ) from None

    # ---------------------------------------------------------------- reading

    def read_runs(self, runs: List[str], spec=None):
        """The rows of ``runs`` with the incremental schema and a ``run`` column."""
        from pyspark.sql import functions as F

        if not runs:
            return self.spark.createDataFrame([], incremental_schema(spec)).withColumn(
                "run", F.lit(None).cast("string")
            )
        df = (
            self.spark.read.schema(incremental_schema(spec))
            .option("basePath", self.uri)
            .parquet(*[self.run_uri(r) for r in runs])
        )
        if "run" not in df.columns:  # only when Spark did not discover the partition column
            df = df.withColumn("run", F.regexp_extract(F.input_file_name(), r"run=([^/]+)/", 1))
        return df


def check_same_model(table_model: Optional[Dict[str, Any]], spec, where: str) -> None:
    """Refuse to add features of another model to a table (one line, exit 2)."""

    if table_model is None:
        raise UsageError(f"{where} records no model: featurize everything again into a new folder")
    if model_identity(table_model) != model_identity(spec.to_dict()):
        raise UsageError(
            f"{where} was made by {table_model.get('name')} {_made_by(table_model)}, not by "
            f"{_made_by(spec.to_dict())}: give the same --weights/--alpha and decode options, "
            "or a new FEATURES folder"
        )


def _made_by(model: Dict[str, Any]) -> str:
    """The options that made features, as the user gave them."""
    words = [f"alpha={model.get('alpha')} {model.get('weights_source')}"]
    if not model.get("exif_orientation", False):  # older features: pixels as stored
        words.append("--ignore-exif-orientation")
    if int(model.get("jpeg_draft", 0)):
        words.append(f"--jpeg-draft {model['jpeg_draft']}")
    return " ".join(words)
