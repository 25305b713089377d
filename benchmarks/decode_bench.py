"""JPEG decode of large photos: full decode against Pillow's draft mode (DCT scaling).

Phone photos are 12 MP; the sample's are 100 x 100 px, where draft mode changes
nothing.  With no large real photos offline, the script makes them from the real
sample photos: each upscaled (bicubic) to 4032 x 3024, with Gaussian sensor-like
noise (sigma 4 levels) so that the JPEG holds high frequencies, saved at quality 92.
For each decode mode it times ``stages.featurize.images.decode_image`` (best of
``--repeats``) and compares the features (LiteRT, bundled alpha-0.35 weights) with
those of the full decode: per-row cosine and max |d|.  The full decode is the
baseline measured in the same process.

Usage::

    python benchmarks/decode_bench.py --quick     # 8 photos, ~1 min
    python benchmarks/decode_bench.py             # 32 photos
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_info, quiet_env, write_results
from benchmarks._table import Col, records_table

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "fruits360"
# (label, decode_image's draft argument)
MODES = [("full decode", 0), ("draft >= 2 x 224", 2), ("draft >= 224", 1)]


def make_photos(n: int, width: int = 4032, height: int = 3024, seed: int = 0) -> List[bytes]:
    """``n`` large JPEGs made from the real sample photos (see the module docstring)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = sorted(SAMPLE.glob("*/*.jpg"))
    picked = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]
    out = []
    for f in picked:
        big = Image.open(f).convert("RGB").resize((width, height), Image.BICUBIC)
        arr = np.asarray(big, dtype=np.float32)
        arr += rng.normal(0.0, 4.0, arr.shape).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def run(n: int, repeats: int) -> Dict[str, Any]:
    """Time each decode mode and compare its features with the full decode's."""
    import numpy as np

    from stages.featurize.engine import prepare_model
    from stages.featurize.images import decode_image, preprocess
    from stages.featurize.litert import litert_featurizer

    photos = make_photos(n)
    _, model = prepare_model("bundled")
    featurize = litert_featurizer(model, threads=1)
    results: Dict[str, Any] = {"photos": n, "mean_bytes": sum(map(len, photos)) / n, "modes": []}
    feats = {}
    for label, draft in MODES:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            arrays = [decode_image(p, draft=draft) for p in photos]
            times.append(time.perf_counter() - t0)
        feats[label] = featurize(preprocess(np.stack(arrays))).astype(np.float64)
        results["modes"].append(
            {"mode": label, "draft": draft, "ms_per_photo": 1000 * min(times) / n, "runs_s": times}
        )
    ref = feats[MODES[0][0]]
    base_ms = results["modes"][0]["ms_per_photo"]
    for m in results["modes"]:
        f = feats[m["mode"]]
        cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
        m.update(
            speedup=base_ms / m["ms_per_photo"],
            min_cosine=float(cos.min()),
            median_cosine=float(np.median(cos)),
            max_abs_diff=float(np.abs(f - ref).max()),
            feature_max=float(np.abs(ref).max()),
        )
    return results


# One row per decode mode (``run``).
COLS = [
    Col("decode", "mode"),
    Col("ms / 12 MP photo", "ms_per_photo"),
    Col("speed-up", "speedup"),
    Col("min cosine", lambda m: f"{m['min_cosine']:.6f}"),
    Col("median cosine", lambda m: f"{m['median_cosine']:.6f}"),
    Col("max |d|", lambda m: f"{m['max_abs_diff']:.4f}"),
]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point."""
    quiet_env()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 photos, best of 2")
    p.add_argument("--photos", type=int, default=None, help="default 32 (quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick 2)")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    n = args.photos or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    res = run(n, repeats)
    t = records_table(COLS, res["modes"])
    print(f"{n} photos of 4032 x 3024, {res['mean_bytes'] / 1e6:.1f} MB each on average\n")
    print(t)
    stem = args.stem or ("decode_quick" if args.quick else "decode")
    data = {
        "benchmark": "decode",
        "command": " ".join(["python", "benchmarks/decode_bench.py", *sys.argv[1:]]),
        "machine": machine_info(),
        **res,
    }
    print(f"wrote {write_results(stem, data, [t])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
