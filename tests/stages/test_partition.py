"""The Python worker's side of featurize: Arrow columns built from buffers, the one-colour
test in linear time, and no pandas import on the way."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.featurize.images import FLAT_SHARE, _flat_share
from stages.featurize.partition import (
    ARROW_BATCH_ROWS,
    arrow_batch_rows,
    features_array,
    string_array,
)
from tests.conftest import SAMPLE

LIST = pa.list_(pa.field("element", pa.float32(), nullable=False))


def _exact_share(arr: np.ndarray) -> float:
    """The reference: count every colour."""
    flat = arr.reshape(-1, 3).astype(np.int64)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    return float(np.unique(codes, return_counts=True)[1].max() / len(codes))


@settings(max_examples=60, deadline=None)
@given(
    side=st.integers(1, 40),
    share=st.floats(0.0, 1.0),
    colours=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_flat_share_is_the_majority_colours_share_exact_above_a_half(side, share, colours, seed):
    rng = np.random.default_rng(seed)
    n = side * side
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    pixels = palette[rng.integers(0, colours, n)]
    pixels[: int(share * n)] = palette[0]  # one colour planted on a share of the pixels
    arr = rng.permutation(pixels).reshape(side, side, 3)
    exact, fast = _exact_share(arr), _flat_share(arr)
    if exact > 0.5:
        assert fast == exact
    else:
        assert fast <= 0.5
    # So the decode's verdict is the one the full count gives.
    assert (fast >= FLAT_SHARE) == (exact >= FLAT_SHARE)


@given(st.lists(st.one_of(st.none(), st.text(max_size=12)), max_size=20))
def test_string_array_equals_pyarrows_own(values):
    built = string_array(values)
    built.validate(full=True)
    assert built.to_pylist() == values
    assert built.null_count == sum(v is None for v in values)


def test_features_array_puts_rows_in_order_and_nulls_where_a_row_failed():
    ok = np.array([True, False, True, True, False])
    feats = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    col = features_array(feats, ok, LIST)
    col.validate(full=True)
    assert col.type == LIST
    assert col.to_pylist() == [feats[0].tolist(), None, feats[1].tolist(), feats[2].tolist(), None]
    # The values buffer is the model's output itself: no copy.
    assert col.values.buffers()[1].address == feats.ctypes.data
    empty = features_array(np.zeros((0, 0), np.float32), np.zeros(2, bool), LIST)
    assert empty.to_pylist() == [None, None]


def test_a_partition_never_imports_pandas(tmp_path):
    """pa.array imports pandas (~1 CPU s per Python worker): the worker's path avoids it."""
    code = f"""
import sys
import numpy as np, pyarrow as pa
from pathlib import Path
from stages.featurize.engine import prepare_model
from stages.featurize.partition import PartitionJob, featurize_partition, string_array
spec, model = prepare_model("bundled", None, "litert")
files = sorted(Path({str(SAMPLE)!r}).glob("*/*.jpg"))[:5] + [Path({str(tmp_path)!r}) / "x.jpg"]
files[-1].write_bytes(b"not a photo")
blobs = [f.read_bytes() for f in files]
offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int32)
buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(blobs))]
content = pa.Array.from_buffers(pa.binary(), len(blobs), buffers)
paths = string_array([str(f) for f in files])
batch = pa.RecordBatch.from_arrays([paths, content], ["path", "content"])
class Model:
    value = model
job = PartitionJob(Model(), "k", spec.alpha, 4, False, "litert")
out = list(featurize_partition([batch], job))
rows = sum(b.num_rows for b in out)
errors = sum(x is not None for b in out for x in b.column(3).to_pylist())
print(rows, errors, "pandas" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["6", "1", "False"]


@given(st.integers(1, 300))
def test_arrow_batches_hold_whole_model_batches_and_at_least_16_rows(batch_size):
    rows = arrow_batch_rows(batch_size)
    assert rows % batch_size == 0
    assert rows >= ARROW_BATCH_ROWS
    assert rows - batch_size < ARROW_BATCH_ROWS  # the fewest model batches that reach 16
