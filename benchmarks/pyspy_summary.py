"""Summarise a ``py-spy record --subprocesses --format raw`` profile of a Spark job.

Splits the samples between the driver's Python and the PySpark workers (processes
under ``pyspark.daemon``), then lists the functions with the most samples, inclusive
(``cumulative``) and exclusive (``self``), in seconds of samples.

Profile a reduce run (py-spy: ``pip install --target /tmp/pyspy py-spy``)::

    /tmp/pyspy/bin/py-spy record --subprocesses --rate 20 --format raw -o /tmp/reduce.txt -- \\
        .venv/bin/python benchmarks/reduce_bench.py --_worker spark --ml-repeats 0 \\
        --features /tmp/fruits-bench-reduce/data/features-100000x1280 --k 50
    python benchmarks/pyspy_summary.py /tmp/reduce.txt --rate 20
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

_LOCATION = re.compile(r" \((?:.*/)?([^/]*:\d+)\)")


def summarise(path: str, rate: float) -> Dict[str, object]:
    """Samples per process kind, and per function (cumulative and self), in seconds."""
    kinds: collections.Counter = collections.Counter()
    cumulative: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    with open(path) as fh:
        for line in fh:
            line = line.rstrip()
            if not line or " " not in line:
                continue
            stack, count_text = line.rsplit(" ", 1)
            count = int(count_text)
            frames = stack.split(";")
            procs = [f for f in frames if f.startswith("process ")]
            code = [f for f in frames if not f.startswith("process ")]
            kind = "worker" if any("pyspark.daemon" in p for p in procs) else "driver"
            kinds[kind] += count
            seen = set()
            for f in code:
                name = _LOCATION.sub("", f)
                if name not in seen:
                    cumulative[(kind, name)] += count
                    seen.add(name)
            if code:
                own[(kind, _LOCATION.sub(r" (\1)", code[-1]))] += count
    return {
        "seconds_by_kind": {k: v / rate for k, v in kinds.items()},
        "cumulative": [(k, n, v / rate) for (k, n), v in cumulative.most_common()],
        "self": [(k, n, v / rate) for (k, n), v in own.most_common()],
    }


def _rows(items: List[Tuple[str, str, float]], top: int, skip: Sequence[str]) -> List[str]:
    out = []
    for kind, name, secs in items:
        if name in skip:
            continue
        out.append(f"{secs:8.1f}  {kind:6}  {name}")
        if len(out) >= top:
            break
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="py-spy raw output")
    p.add_argument("--rate", type=float, default=100.0, help="the --rate given to py-spy")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    s = summarise(args.profile, args.rate)
    print(
        "seconds of samples by process:", {k: round(v, 1) for k, v in s["seconds_by_kind"].items()}
    )
    # Frames every worker sample passes through say nothing about where the time goes.
    plumbing = (
        "<module>",
        "_run_module_as_main",
        "_run_code",
        "manager",
        "worker",
        "main",
        "Thread._bootstrap",
    )
    print("\ncumulative (s, kind, function)")
    print("\n".join(_rows(s["cumulative"], args.top, plumbing)))  # type: ignore[arg-type]
    print("\nself (s, kind, function)")
    print("\n".join(_rows(s["self"], args.top, ())))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
