"""The fair single-process limit of stage 1: what one Python process reaches on the same cores.

One process, no Spark: list the JPEGs, read and decode them with
:func:`stages.featurize.images.decode_image` (the same checks as the pipeline: EXIF, the
one-colour test) on a thread pool that runs ahead of the model, so decoding overlaps
inference; run the MobileNetV2 flatbuffer with LiteRT (XNNPACK on all cores) in
batches of 16; write the same Parquet columns as ``fruits-pipeline featurize``
(``path, label, features list<float>, error``).  The flatbuffer is converted
*beforehand* and read from a file (``--model``): conversion is never timed.

Run it as a whole process::

    python benchmarks/litert_limit.py IMAGES OUT [--alpha 1.0 | --model F.tflite]

``featurize_bench.py --limit`` runs it beside ``fruits-pipeline featurize`` on the
same photos and prints the ratios; ``featurize_bench.py``'s in-process LiteRT
baseline is :class:`Limit` too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

# Run as a script: this repository first (site-packages holds an unrelated ``benchmarks``),
# and before it the patched copy of ``stages/`` that featurize_bench.py --code measures.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("FRUITS_BENCH_CODE"):
    sys.path.insert(0, os.environ["FRUITS_BENCH_CODE"])

BATCH = 16
# Batches decoded ahead of the one the model runs: enough to hide a slow photo.
AHEAD = 2


def list_images(folder: str) -> List[str]:
    """The JPEGs under ``folder`` (``<Class>/<file>.jpg``, any case), sorted."""
    files = glob.glob(os.path.join(folder, "**", "*.*"), recursive=True)
    return sorted(f for f in files if f.lower().endswith((".jpg", ".jpeg")))


def weights_for(alpha: float) -> str:
    """``bundled`` (real ImageNet) at alpha 0.35; seeded random weights otherwise."""
    return "bundled" if abs(alpha - 0.35) < 1e-9 else "random:0"


def model_file(alpha: float) -> str:
    """The flatbuffer ``featurize --weights weights_for(alpha)`` broadcasts, as a file.

    Alpha 0.35: the bundled weights' shipped flatbuffer.  Otherwise the driver's
    conversion cache, converted now on a miss (the preparation: never timed).
    """
    from stages.featurize.engine import prepare_model
    from stages.featurize.litert import BUNDLED_TFLITE, converter_version, tflite_cache_dir

    if weights_for(alpha) == "bundled":
        return str(BUNDLED_TFLITE)
    spec, _ = prepare_model(weights_for(alpha), alpha, "litert")
    name = f"{spec.weights_sha256}-alpha{spec.alpha:g}-tf{converter_version()}.tflite"
    return str(tflite_cache_dir() / name)


def load_photo(path: str) -> Tuple[str, str, Any, Optional[str]]:
    """``(path, label, uint8 array or None, error or None)`` of one photo file."""
    from stages.featurize.images import DecodeError, decode_image

    label = Path(path).parent.name
    try:
        with open(path, "rb") as fh:
            return path, label, decode_image(fh.read()), None
    except DecodeError as exc:
        return path, label, None, str(exc)
    except OSError as exc:
        return path, label, None, f"cannot read: {exc}"


def decoded_batches(
    files: Sequence[str], pool: ThreadPoolExecutor, batch: int = BATCH
) -> Iterator[list]:
    """Batches of :func:`load_photo` results, decoded by ``pool`` up to :data:`AHEAD`
    batches ahead of the one being consumed."""
    pending: list = []
    starts = iter(range(0, len(files), batch))

    def submit() -> None:
        i = next(starts, None)
        if i is not None:
            pending.append([pool.submit(load_photo, f) for f in files[i : i + batch]])

    for _ in range(AHEAD + 1):
        submit()
    while pending:
        futures = pending.pop(0)
        submit()
        yield [f.result() for f in futures]


class Limit:
    """One LiteRT interpreter read from a flatbuffer file, and a decode thread pool.

    Parameters
    ----------
    model : str
        A ``.tflite`` file (input (n, 224, 224, 3) float32).
    threads : int
        XNNPACK threads; 0: all cores.
    batch : int
        Images per ``invoke``.
    decoders : int
        Decode threads; 0: all cores.
    """

    def __init__(self, model: str, threads: int = 0, batch: int = BATCH, decoders: int = 0):
        from ai_edge_litert.interpreter import Interpreter

        cores = os.cpu_count() or 1
        self.interp = Interpreter(model_path=model, num_threads=threads or cores)
        self._in = self.interp.get_input_details()[0]["index"]
        self._out = self.interp.get_output_details()[0]["index"]
        self._n = 0
        self.batch = batch
        self.decoders = decoders or cores

    def infer(self, x):
        """Features (n, width) float32 of a preprocessed float32 batch ``x``."""
        from stages.featurize.images import IMAGE_SIZE

        if x.shape[0] != self._n:
            self.interp.resize_tensor_input(self._in, [x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3])
            self.interp.allocate_tensors()
            self._n = x.shape[0]
        self.interp.set_tensor(self._in, x)
        self.interp.invoke()
        return self.interp.get_tensor(self._out)

    def featurize_files(self, files: Sequence[str]) -> Dict[str, Any]:
        """Read, decode (overlapped), infer: ``{paths, labels, features, valid, errors}``."""
        import numpy as np

        from stages.featurize.images import preprocess

        out: Dict[str, Any] = {"paths": [], "labels": [], "errors": [], "valid": []}
        feats = []
        with ThreadPoolExecutor(self.decoders) as pool:
            for rows in decoded_batches(files, pool, self.batch):
                for p, lab, arr, err in rows:
                    out["paths"].append(p)
                    out["labels"].append(lab)
                    out["errors"].append(err)
                    out["valid"].append(arr is not None)
                arrays = [r[2] for r in rows if r[2] is not None]
                if arrays:
                    feats.append(self.infer(preprocess(np.stack(arrays))))
        out["features"] = np.concatenate(feats) if feats else np.zeros((0, 1280), np.float32)
        out["valid"] = np.array(out["valid"], dtype=bool)
        return out


def write_parquet(result: Dict[str, Any], out: str) -> None:
    """``out/part-0.parquet`` with featurize's columns (features as list<float>)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok, values = result["valid"], result["features"]
    offsets = np.zeros(len(ok) + 1, np.int32)
    offsets[1:] = np.cumsum(ok) * values.shape[1]
    features = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values.ravel()), mask=pa.array(~ok)
    )
    table = pa.table(
        {
            "path": pa.array(result["paths"], pa.string()),
            "label": pa.array(result["labels"], pa.string()),
            "features": features,
            "error": pa.array(result["errors"], pa.string()),
        }
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    # No dictionary for the floats: a dictionary of 1280 distinct floats a row never pays.
    pq.write_table(
        table, str(Path(out) / "part-0.parquet"), use_dictionary=["path", "label", "error"]
    )


def run(images: str, out: str, model: str, threads: int = 0, batch: int = BATCH) -> dict:
    """Featurize ``images`` into ``out/part-0.parquet``; counts and seconds."""
    t0 = time.perf_counter()
    result = Limit(model, threads, batch).featurize_files(list_images(images))
    write_parquet(result, out)
    return {
        "images": len(result["paths"]),
        "errors": int((~result["valid"]).sum()),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``IMAGES OUT [--model F | --alpha A]``; prints one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--model", help="a .tflite file (default: the one of --alpha)")
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--threads", type=int, default=0, help="XNNPACK threads (0: all cores)")
    p.add_argument("--batch", type=int, default=BATCH)
    args = p.parse_args(argv)
    model = args.model or model_file(args.alpha)
    print(json.dumps(run(args.images, args.out, model, args.threads, args.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
