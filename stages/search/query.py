"""The app's queries: a photo in, the most similar photos of the collection out.

:class:`SearchIndex` opens ``RESULTS/index/`` (:mod:`stages.reduce.index`) memory-mapped;
:class:`QueryEngine` featurizes and projects a query photo with the model and PCA that
made the index, searches it and votes a label; :func:`decode_upload` decodes an upload
with the limits of a public web service.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import Counter
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from linalg.openset import OpenSet, reference_rows
from linalg.vectors import DEFAULT_NPROBE, VectorIndex
from stages.base.errors import UsageError
from stages.base.params import TOP_MAX
from stages.featurize.images import preprocess
from stages.reduce.index import FORMAT, local_results, sha256_hex
from stages.reduce.pca_model import PCAModel
from stages.search.upload import decode_upload
from stages.storage.layout import ARRAYS, INDEX_DIR, INDEX_META, MODEL_DIR, MODEL_META
from stages.storage.shards import ShardSet

logger = logging.getLogger(__name__)

__all__ = [
    "TOP_MAX",
    "VectorIndex",
    "SearchIndex",
    "QueryEngine",
    "vote",
]


RELOAD_CHECK_S = 1.0  # how often a QueryEngine looks for a new index generation


# ---------------------------------------------------------------------------- images


# ---------------------------------------------------------------------------- querying


def _stamp(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class SearchIndex:
    """``RESULTS/index/`` loaded for queries: every file memory-mapped, a row's path,
    label and thumbnail read by row id when asked; the IVF index (if any) in memory."""

    def __init__(self, results: str) -> None:
        base = os.path.join(local_results(results), INDEX_DIR)
        path = os.path.join(base, INDEX_META)
        if not os.path.isfile(path):
            raise UsageError(
                f"{results} has no search index: run `fruits-pipeline index {results}`"
            )
        self.stamp = _stamp(path)
        with open(path, encoding="utf-8") as fh:
            self.meta: Dict[str, Any] = json.load(fh)
        if self.meta.get("format") != FORMAT:
            raise UsageError(f"{base} is an index of another format: run `fruits-pipeline index`")
        try:
            self.rows = ShardSet(base, self.meta["shards"], self.meta["labels"])
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"{base} is incomplete ({exc}): run `fruits-pipeline index {results}`"
            ) from None
        ann, nprobe = None, DEFAULT_NPROBE
        if self.meta["kind"] == "faiss-ivf":
            import faiss

            ann = faiss.read_index(os.path.join(base, self.meta["ivf"]["file"]))
            nprobe = int(self.meta["ivf"]["nprobe"])
        self.vectors = VectorIndex(self.rows, ann, nprobe)
        if len(self.rows) != self.meta["rows"] or (
            ann is not None and ann.ntotal != len(self.rows)
        ):
            raise UsageError(f"{base} is inconsistent: run `fruits-pipeline index {results}`")
        names = self.rows.label_names
        # Photos of each label in the collection (one pass over the shards' label codes).
        self.photos = Counter(dict(zip(names, self.rows.label_counts())))
        rule = self.meta["open_set"]
        ref = rule["reference"]  # the rows the rule was calibrated on (appended rows are not)
        ids = reference_rows(self.rows.key_blocks(int(ref["of"])), int(ref["rows"]))
        labels = [self.rows.label(int(i)) for i in ids]
        paths = [self.rows.path(int(i)) for i in ids]  # the calibration's order (path)
        self.open_set = OpenSet(rule, self.rows.take(ids), labels, paths)

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, row: int) -> str:
        """The image path of a row."""
        return self.rows.path(row)

    def label(self, row: int) -> str:
        """The label of a row."""
        return self.rows.label(row)

    def thumbnail(self, row: int) -> Optional[bytes]:
        """The JPEG thumbnail of a row, or ``None``."""
        return self.rows.thumbnail(row)


def vote(labels: Sequence[str], distances: Sequence[float]) -> Dict[str, Any]:
    """The most frequent label of the matches (a tie goes to the label of the nearer match)
    and its ``margin``: its count less the next label's."""
    counts = Counter(labels)
    best = max(counts.values())
    first = {}
    for lab, d in zip(labels, distances):
        first.setdefault(lab, d)
    label = min((lab for lab, c in counts.items() if c == best), key=lambda lab: first[lab])
    second = max((c for lab, c in counts.items() if lab != label), default=0)
    return {"label": label, "count": best, "of": len(labels), "margin": best - second}


NO_MATCH = "This fruit does not look like any in the collection yet"


def open_set_info(rule: Dict[str, Any]) -> Dict[str, Any]:
    """What an answer says of the open-set rule: the rule, its threshold and, when it was
    calibrated, the rates measured on the collection (else why not, and the fallback)."""
    keys = ("rule", "threshold", "range_limit", "calibrated", "known_accepted", "unknown_rejected")
    keys += ("auroc", "fpr_at_95_tpr", "reason", "fallback")
    return {k: rule[k] for k in keys if k in rule}


def _data_uri(jpeg: Optional[bytes]) -> Optional[str]:
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class QueryEngine:
    """Photo in, matches out: the model that made the features, the PCA, the index.

    Parameters
    ----------
    results : str
        A local RESULTS folder with ``pca_model/`` and ``index/``.

    Raises
    ------
    UsageError
        Missing or stale index, or weights that are not the ones that made the features.
    """

    def __init__(self, results: str) -> None:
        folder = os.path.join(local_results(results), MODEL_DIR)
        if not os.path.isfile(os.path.join(folder, ARRAYS)):
            raise UsageError(f"{results} has no pca_model/: give a RESULTS folder of `reduce`")
        self.results = results
        self._model_files = (os.path.join(folder, ARRAYS), os.path.join(folder, MODEL_META))
        self.index = SearchIndex(results)
        self.pca, self._pca_sha = self._load_pca(self.index)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._loader: Optional[threading.Thread] = None
        try:
            self._featurize = self.pca.featurizer()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        spec = self.pca.features_model
        self._exif_orientation = bool(spec.get("exif_orientation", False))
        self._jpeg_draft = int(spec.get("jpeg_draft", 0))
        self.model_info = {
            "name": spec.get("name"),
            "alpha": spec.get("alpha"),
            "weights_source": spec.get("weights_source"),
            "weights_sha256": spec.get("weights_sha256"),
            "k": self.pca.n_components_,
        }
        self._describe_index()

    def _load_pca(self, index: SearchIndex):
        arrays_path, meta_path = self._model_files
        with open(arrays_path, "rb") as fh:
            arrays = fh.read()  # read once: hashed here, loaded below
        sha = sha256_hex(arrays)
        if sha != index.meta["pca_arrays_sha256"]:
            raise UsageError(
                f"{self.results}/index was built from another PCA: "
                f"run `fruits-pipeline index {self.results}`"
            )
        with open(meta_path, "rb") as fh:
            pca = PCAModel.from_files(arrays, fh.read())
        if pca.n_components_ != index.meta["dims"]:
            raise UsageError(
                f"{self.results}/index does not match its PCA: run `fruits-pipeline index`"
            )
        return pca, sha

    def _describe_index(self) -> None:
        self.model_info.update(
            {
                "k": self.pca.n_components_,
                "rows": len(self.index),
                "index": self.index.vectors.kind,
                "generation": self.index.meta.get("generation"),
                "recall_at_10": self.index.meta.get("recall_at_10"),
                "open_set": open_set_info(self.index.meta["open_set"]),
            }
        )

    def refresh(self, wait: bool = False) -> bool:
        """Load a new index generation if ``index.json`` changed (checked at most once
        every :data:`RELOAD_CHECK_S` unless ``wait``); in a background thread unless
        ``wait``.  Queries go on with the loaded index meanwhile.  Returns whether a
        load was started (and, with ``wait``, finished)."""
        now = time.monotonic()
        if not wait and now - self._checked < RELOAD_CHECK_S:
            return False
        self._checked = now
        path = os.path.join(local_results(self.results), INDEX_DIR, INDEX_META)
        try:
            stamp = _stamp(path)
        except OSError:
            return False  # between a rebuild's swap steps: look again later
        with self._lock:
            if stamp == self.index.stamp or (self._loader and self._loader.is_alive()):
                return False
            self._loader = threading.Thread(target=self._reload, name="fruits-reload", daemon=True)
            self._loader.start()
        if wait:
            self._loader.join()
        return True

    def _reload(self) -> None:
        try:
            index = SearchIndex(self.results)
            if index.meta["pca_arrays_sha256"] == self._pca_sha:
                pca, sha = self.pca, self._pca_sha
            else:  # reduce --update: a new PCA and its index
                pca, sha = self._load_pca(index)
        except Exception as exc:  # a half-written or broken index: keep serving the old one
            logger.warning(f"index of {self.results} not reloaded: {exc}")
            return
        self.index, self.pca, self._pca_sha = index, pca, sha
        self._describe_index()
        logger.info(
            f"index of {self.results}: generation {index.meta.get('generation')} loaded, "
            f"{len(index)} rows"
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Decoded images (n, 224, 224, 3) uint8 to PCA coordinates (n, k)."""

        return self.pca.transform(self._featurize(preprocess(images)))

    def answer(self, point: np.ndarray, top: int = 10) -> Dict[str, Any]:
        """The answer object for one projected photo (see the README): ``label`` (``None``
        when the open-set rule finds no close match), the collection's ``photos`` of it, the
        ``vote`` of the matches and its margin, the ``verdict`` sentence, the ``matches``
        (each marked ``match`` or not) and the rule's ``score`` against its threshold."""
        self.refresh()
        index = self.index  # one generation for the whole answer
        ids, dist = index.vectors.search(point[None, :], top)
        ids, dist = ids[0], dist[0]
        labels = [index.label(int(i)) for i in ids]
        v = vote(labels, dist)
        accepted, score, in_range = index.open_set.accept(point[None, :])
        close = bool(accepted[0])
        matches = [
            {
                "path": index.path(int(i)),
                "label": lab,
                "distance": round(float(d), 4),
                "match": close and lab == v["label"],
                "thumbnail": _data_uri(index.thumbnail(int(i))),
            }
            for i, lab, d in zip(ids, labels, dist)
        ]
        rule = index.meta["open_set"]
        if close:
            photos = index.photos[v["label"]]
            verdict = (
                f"{v['label']} — {v['count']} of the {v['of']} nearest (margin {v['margin']}); "
                f"the collection holds {photos} photo{'s' * (photos != 1)} of it"
            )
        else:
            photos = None
            verdict = f"{NO_MATCH}: the nearest photos below are not a match"
            if not in_range[0]:
                verdict += " (it lies outside the range of every photo the collection holds)"
        return {
            "label": v["label"] if close else None,
            "photos": photos,
            "vote": v,
            "close_match": close,
            "verdict": verdict,
            "open_set": {
                "score": round(float(score[0]), 4),
                "threshold": rule.get("threshold"),
                "in_range": bool(in_range[0]),
                "rule": rule["rule"],
                "calibrated": rule["calibrated"],
            },
            "matches": matches,
            "model": self.model_info,
        }

    def decode(self, data: bytes) -> np.ndarray:
        """:func:`decode_upload` with the EXIF handling that made the features."""
        return decode_upload(data, exif_orientation=self._exif_orientation, draft=self._jpeg_draft)

    def similar_bytes(self, data: bytes, top: int = 10) -> Dict[str, Any]:
        """Decode, featurize, project and search one photo (raises :class:`BadImage`)."""
        return self.answer(self.embed(self.decode(data)[None])[0], top)
