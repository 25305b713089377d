"""The RESULTS layout, spelled once: what stage 2 writes and the app and the report read.

::

    RESULTS/
      summary.json        the run's summary (reduce, reduce --update)
      pca_model/          arrays.npz + model.json (stages.reduce.pca_model)
      projections/        path, label, pc1..pck (Parquet; watch adds watch-<run>.parquet)
      index/              index.json + the search index's files (stages.reduce.index)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARRAYS",
    "INDEX_DIR",
    "INDEX_META",
    "MODEL_DIR",
    "MODEL_META",
    "PROJECTIONS",
    "RESULTS_PARTS",
    "SUMMARY",
    "Results",
]

SUMMARY = "summary.json"
MODEL_DIR = "pca_model"
ARRAYS = "arrays.npz"  # in MODEL_DIR
MODEL_META = "model.json"  # in MODEL_DIR
PROJECTIONS = "projections"
INDEX_DIR = "index"
INDEX_META = "index.json"  # in INDEX_DIR
# What a RESULTS folder holds, in the order an update swaps them in.
RESULTS_PARTS = (PROJECTIONS, MODEL_DIR, INDEX_DIR, SUMMARY)


@dataclass(frozen=True)
class Results:
    """The paths of one RESULTS folder (a local path or a Hadoop URI)."""

    uri: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", self.uri.rstrip("/") or "/")

    def part(self, *names: str) -> str:
        """``uri/name/...``."""
        return "/".join((self.uri, *names))

    @property
    def summary(self) -> str:
        return self.part(SUMMARY)

    @property
    def model(self) -> str:
        return self.part(MODEL_DIR)

    @property
    def arrays(self) -> str:
        return self.part(MODEL_DIR, ARRAYS)

    @property
    def model_meta(self) -> str:
        return self.part(MODEL_DIR, MODEL_META)

    @property
    def projections(self) -> str:
        return self.part(PROJECTIONS)

    @property
    def index(self) -> str:
        return self.part(INDEX_DIR)

    @property
    def index_meta(self) -> str:
        return self.part(INDEX_DIR, INDEX_META)
