"""What a run would take and cost on EMR clusters of several instance types and sizes.

A model, not a measurement: the one ``fruits-pipeline emr plan`` prints before a start
(``cluster.costs.estimate``: featurize then reduce, start-up included; EC2, EMR uplift, EBS
and S3 requests), swept over instance types, node counts and Spot task nodes.  The
per-core throughput is the latest ``benchmarks/results/featurize*.json`` (Spark steady
state on this machine, per executor core) or ``--img-per-core-s``; the rest are the
**assumptions to check** that ``cluster/costs.py`` and ``cluster/sizing.py`` list (prices
recalled, not fetched; ~8 min start-up; one 15 ms S3 GET per image overlapping inference;
node efficiency 0.9; an EMR vCPU, x86_64 or Graviton, as fast as a core here; Spot at 0.4 x
on-demand).

``--cluster-id j-XXX`` instead submits the partition sweep as real EMR steps and reads
their times (needs AWS credentials and a cluster started by ``fruits-pipeline emr up``).

Usage::

    python benchmarks/instance_sizes.py --quick          # alpha 1.0 from the latest results
    python benchmarks/instance_sizes.py --img-per-core-s 60 --alpha 1.0
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # site-packages has a
# `benchmarks` package of its own: this repository first.

from benchmarks._common import RESULTS_DIR, write_results
from benchmarks._table import pyplot, save_figure, show_tables, table

IMAGE_COUNTS = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
NODES = (2, 4, 8, 16)  # core nodes; or 2 core + (N - 2) Spot task nodes
TYPES = (
    "m5.large", "m5.xlarge", "m5.2xlarge", "c5.xlarge", "r5.xlarge",
    "m6g.large", "m6g.xlarge", "m7g.large", "m7g.xlarge", "m7g.2xlarge", "c7g.xlarge", "r7g.xlarge",
)  # fmt: skip


PRICE_SOURCE = (
    "on-demand Linux EC2 + Amazon EMR uplift, Europe (Paris) eu-west-3, USD/hour, 2024 list "
    "prices as recalled (Graviton: US East x 1.17) from aws.amazon.com/ec2/pricing/on-demand "
    "and aws.amazon.com/emr/pricing; NOT fetched: check before quoting (cluster/sizing.py)"
)


@dataclass(frozen=True)
class Config:
    """One cluster of the sweep: ``core`` on-demand core nodes, ``task`` Spot task nodes."""

    type: str
    core: int
    task: int = 0

    @property
    def label(self) -> str:
        """``m5.large x8`` or ``m5.large 2+6 spot``."""
        spot = f"{self.core}+{self.task} spot" if self.task else f"x{self.core}"
        return f"{self.type} {spot}"


def configs() -> List[Config]:
    """Every type at every node count, on-demand, and with Spot task nodes beyond 2 core."""
    out = [Config(t, n) for t in TYPES for n in NODES]
    return out + [Config(t, 2, n - 2) for t in TYPES for n in NODES if n > 2]


def latest_featurize(alpha: float) -> Optional[Dict[str, Any]]:
    """The newest ``results/featurize*.json`` (quick or full) that measured ``alpha``,
    else the newest with any figures; A/B runs of patched code (``--code``) are skipped."""
    files = [
        f
        for f in glob.glob(str(RESULTS_DIR / "featurize*.json"))
        if not any(tag in Path(f).stem for tag in ("_dev", "_test", "_ab"))
    ]
    found = []
    for f in sorted(files, key=os.path.getmtime, reverse=True):
        data = json.loads(Path(f).read_text())
        if data.get("summary"):
            data["_file"] = f
            found.append(data)
    for data in found:
        if any(abs(float(r["alpha"]) - alpha) < 1e-9 for r in data["summary"]):
            return data
    return found[0] if found else None


def throughput_inputs(args) -> Dict[str, Any]:
    """Per-core img/s and the fixed per-run cost, from a flag or the latest results."""
    if args.img_per_core_s:
        return {
            "img_per_core_s": args.img_per_core_s,
            "fixed_s": args.fixed_s if args.fixed_s is not None else 30.0,
            "source": "--img-per-core-s",
        }
    data = latest_featurize(args.alpha)
    if data is None:
        raise SystemExit(
            "no benchmarks/results/featurize*.json yet: run benchmarks/featurize_bench.py "
            "--quick, or give --img-per-core-s"
        )
    rows = {float(r["alpha"]): r for r in data["summary"]}
    alpha = args.alpha if args.alpha in rows else sorted(rows)[-1]
    r = rows[alpha]
    note = "" if alpha == args.alpha else f" (alpha {args.alpha} not measured: using {alpha})"
    return {
        "img_per_core_s": r["img_per_core_s"],
        "fixed_s": args.fixed_s if args.fixed_s is not None else (r.get("one_off_cold_s") or 30.0),
        "alpha": alpha,
        "source": f"{Path(data['_file']).name} ({data['machine']['time_utc']}), "
        f"alpha {alpha}{note}",
    }


def plan_row(cfg: Config, images: int, rate: float, args) -> Dict[str, Any]:
    """Time and cost of one run of ``images`` on ``cfg`` (``cluster.costs.estimate``)."""
    from cluster import costs
    from cluster.spec import ClusterOptions

    opts = ClusterOptions(
        bucket="b-b", instance_type=cfg.type, core=cfg.core, task=cfg.task, spot=cfg.task > 0
    )
    model = costs.Model(
        startup_s=args.startup_min * 60,
        efficiency=args.efficiency,
        s3_get_ms=args.s3_get_ms,
        s3_in_flight=args.s3_in_flight,
        list_per_s=args.list_per_s,
        img_per_core_s=rate,
        **({"step_start_s": args.fixed_s} if args.fixed_s is not None else {}),
    )
    est = costs.estimate(opts, images, "model", "litert", args.alpha, model)
    return {
        "type": cfg.type,
        "config": cfg.label,
        "core_nodes": cfg.core,
        "spot_task_nodes": cfg.task,
        "slots": est.slots,
        "img_s": est.slots * est.slot_rate,
        "s3_bound": est.s3_bound,
        "images": images,
        "total_s": est.total_s,
        "usd": est.total_usd,
        "usd_items": est.usd,
        "usd_per_million": est.total_usd / images * 1e6,
        "usd_per_hour": costs.hourly_cost(opts)["total_usd"],
    }


def time_cost(r: Dict[str, Any]) -> str:
    """A plan's cell: ``1h02m $3.45``."""
    from cluster.costs import hms

    return f"{hms(r['total_s'])} ${r['usd']:.2f}"


def model(args) -> int:
    """Print the time/cost tables and the assumptions; write JSON and a PNG."""
    from cluster import costs

    inputs = throughput_inputs(args)
    rate = inputs["img_per_core_s"]
    counts = IMAGE_COUNTS
    sweep = configs()
    rows = [plan_row(cfg, images, rate, args) for cfg in sweep for images in counts]
    step_s = args.fixed_s if args.fixed_s is not None else costs.STEP_START_S
    assumptions = [
        f"per-core throughput {rate:.1f} img/s ({inputs['source']}), x86_64 and Graviton alike",
        f"cluster start-up {args.startup_min:g} min, billed; {step_s:g} s to start each step",
        f"per-node efficiency {args.efficiency:g} (NodeManager, DataNode, OS)",
        f"S3 first-byte latency {args.s3_get_ms:g} ms per image, {args.s3_in_flight} GETs in "
        "flight per slot, overlapped with inference",
        f"listing {args.list_per_s:g} objects/s; reduce: 0.236 core-s per 1000 rows (local fit)",
        f"prices: {PRICE_SOURCE}; EBS gp3 {costs.EBS_USD_PER_GIB_MONTH} USD/GiB-month; S3 "
        f"{costs.S3_GET_USD_PER_1000} USD per 1000 GET, {costs.S3_PUT_LIST_USD_PER_1000} per "
        f"1000 PUT/LIST; Spot EC2 at {costs.SPOT_FRACTION:g} x on-demand",
        "primary node: same type as the others, billed; slots = nodes x Python workers"
        " per node - the driver's container",
    ]
    print("Assumptions (check them):")
    for a in assumptions:
        print("  - " + a)
    print()
    headers = ["cluster", "slots", "USD/h", "img/s", *[f"{n:.0e} images" for n in counts]]
    body = []
    for cfg in sweep:
        cells = [r for r in rows if r["config"] == cfg.label]
        body.append(
            [cfg.label, cells[0]["slots"], cells[0]["usd_per_hour"], cells[0]["img_s"]]
            + [time_cost(c) for c in cells]
        )
    tables = [table(headers, body, digits=2)]
    best = []
    for images in counts:
        sub = [r for r in rows if r["images"] == images]
        cheap = min(sub, key=lambda r: (r["usd"], r["total_s"]))
        fast = min(sub, key=lambda r: (r["total_s"], r["usd"]))
        best.append(
            [
                f"{images:.0e}",
                cheap["config"],
                time_cost(cheap),
                f"{cheap['usd_per_million']:.2f}",
                fast["config"],
                time_cost(fast),
            ]
        )
    heads = ["images", "cheapest", "time / cost", "USD per 1M images", "fastest", "time / cost"]
    tables.append(table(heads, best))
    big = max(counts)
    items = min((r for r in rows if r["images"] == big), key=lambda r: r["usd"])["usd_items"]
    tables.append(
        f"cheapest at {big:.0e} images, itemised (USD): "
        + ", ".join(f"{k} {v:.2f}" for k, v in items.items())
    )
    if any(r["s3_bound"] for r in rows):
        tables.append(
            f"note: at {rate:.1f} img/s per core and {args.s3_get_ms:g} ms per S3 GET, the "
            f"slots of {len({r['type'] for r in rows if r['s3_bound']})} of {len(TYPES)} types "
            "wait on S3, not the model"
        )
    show_tables(tables)
    stem = args.stem or "instance_sizes"
    data = {
        "benchmark": "instance_sizes",
        "command": " ".join(["python", "benchmarks/instance_sizes.py", *sys.argv[1:]]),
        "assumptions": assumptions,
        "inputs": inputs,
        "parameters": {
            "startup_min": args.startup_min,
            "efficiency": args.efficiency,
            "s3_get_ms": args.s3_get_ms,
            "s3_in_flight": args.s3_in_flight,
            "list_per_s": args.list_per_s,
        },
        "rows": rows,
    }
    path = write_results(stem, data, tables)
    plot(rows, RESULTS_DIR / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    """Cost against time for every on-demand configuration, at 1e6 and 1e7 images."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    markers = "osD^vP*Xdh<>"
    for ax, images in zip(axes, (1_000_000, 10_000_000)):
        for t, marker in zip(TYPES, markers):
            pts = [
                r for r in rows if r["type"] == t and r["images"] == images
                and not r["spot_task_nodes"]
            ]  # fmt: skip
            ax.plot(
                [r["total_s"] / 3600 for r in pts],
                [r["usd"] for r in pts],
                marker=marker,
                label=t,
            )
            for r in pts:
                ax.annotate(str(r["core_nodes"]), (r["total_s"] / 3600, r["usd"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("hours (start-up included)")
        ax.set_ylabel("USD (assumed prices)")
        ax.set_title(f"{images:.0e} images (labels: core nodes)")
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


# ---------------------------------------------------------------- real EMR (not runnable here)


def emr_sweep(args) -> int:
    """Submit the featurize partition sweep as EMR steps on ``--cluster-id``; time them.

    Steps from ``cluster.spec.stage_step``, added with ``cluster.emr.add_step``
    (``command-runner.jar spark-submit``).  Each step's
    time is its EMR timeline (start to end), so it includes spark-submit and YARN.
    """
    import boto3

    if not (args.input and args.output and args.code):
        raise SystemExit(
            "--cluster-id needs --input s3://..., --output s3://... and --code s3://.../"
        )
    partitions = [int(p) for p in args.partitions.split(",")]
    emr = boto3.client("emr", region_name=args.region)
    from cluster import emr as cemr
    from cluster import spec as cspec

    step_ids: List[Tuple[int, str]] = []
    for p in partitions:
        out = f"{args.output.rstrip('/')}/sweep-p{p}/"
        stage_args = ["--partitions", str(p), "--weights", args.weights, "--overwrite"]
        step = cspec.stage_step("featurize", args.input, out, args.code, stage_args)
        step["Name"] = f"bench featurize p={p}"
        sid = cemr.add_step(emr, args.cluster_id, step)
        print(f"emr: step {sid} ({step['Name']}) added to {args.cluster_id}", flush=True)
        step_ids.append((p, sid))
    rows = []
    for p, sid in step_ids:  # steps run one after another (EMR's default concurrency 1)
        emr.get_waiter("step_complete").wait(
            ClusterId=args.cluster_id, StepId=sid, WaiterConfig={"Delay": 30, "MaxAttempts": 2880}
        )
        st = emr.describe_step(ClusterId=args.cluster_id, StepId=sid)["Step"]["Status"]
        tl = st.get("Timeline", {})
        secs = (
            (tl["EndDateTime"] - tl["StartDateTime"]).total_seconds()
            if "EndDateTime" in tl
            else None
        )
        rows.append(
            [p, sid, st["State"], secs, args.images / secs if secs and args.images else None]
        )
    tables = [table(["partitions", "step", "state", "seconds", "img/s"], rows)]
    print(tables[0])
    write_results(
        args.stem or "instance_sizes_emr",
        {"cluster_id": args.cluster_id, "region": args.region, "steps": rows, "time": time.time()},
        tables,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="same tables (the model is instant)")
    p.add_argument("--img-per-core-s", type=float, default=None, help="instead of the results JSON")
    p.add_argument("--alpha", type=float, default=1.0, help="which measured alpha (default 1.0)")
    p.add_argument(
        "--fixed-s", type=float, default=None, help="seconds to start each step (default 45)"
    )
    p.add_argument("--startup-min", type=float, default=8.0)
    p.add_argument("--efficiency", type=float, default=0.9)
    p.add_argument("--s3-get-ms", type=float, default=15.0)
    p.add_argument(
        "--s3-in-flight", type=int, default=32, help="GETs in flight per slot (1: one at a time)"
    )
    p.add_argument("--list-per-s", type=float, default=10000.0, help="S3 listing, objects/s")
    p.add_argument("--stem", default=None)
    g = p.add_argument_group("real EMR sweep (needs AWS; not run here)")
    g.add_argument("--cluster-id", default=None, help="j-XXXX: submit the sweep as EMR steps")
    g.add_argument("--region", default="eu-west-3")
    g.add_argument("--input", default=None, help="s3://bucket/Test/")
    g.add_argument("--output", default=None, help="s3://bucket/bench/")
    g.add_argument("--code", default=None, help="s3://bucket/code/<version>/ (wheel + scripts)")
    g.add_argument("--weights", default="imagenet")
    g.add_argument("--images", type=int, default=None, help="image count of --input (for img/s)")
    g.add_argument("--partitions", default="8,16,32,64")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.cluster_id:
        return emr_sweep(args)
    return model(args)


if __name__ == "__main__":
    sys.exit(main())
