"""What a featurize run would take and cost on EMR clusters of several instance types and sizes.

A model, not a measurement: the per-core throughput comes from the latest
``benchmarks/results/featurize*.json`` (Spark steady state on this machine, per
executor core) or ``--img-per-core-s``; the rest are **assumptions to check**:

* prices: on-demand EC2 + the EMR uplift, eu-west-3 (Paris), USD per hour, from
  ``cluster.sizing.INSTANCE_TYPES``, recalled from
  https://aws.amazon.com/ec2/pricing/on-demand/ and https://aws.amazon.com/emr/pricing/
  (2024 list prices; not fetched here: no network); per-second billing, one-minute
  minimum; the primary node is the same type as the core nodes and is billed too;
* cluster start-up ~8 min (billed), once per run;
* executor slots from ``cluster.sizing.executor_layout`` (one Python worker per slot,
  memory-bound types get fewer slots with more threads) minus the driver's container;
  a per-node efficiency (default 0.9) for the NodeManager, DataNode and OS;
* an EMR vCPU runs MobileNetV2 as fast as one core of this machine (m5 and c5 are
  Xeons of similar clock; c5's is ~10% higher: not counted);
* S3 first-byte latency per request (default 15 ms); each photo costs
  ``--s3-requests-per-photo`` requests (1 GET: measured by ``benchmarks/s3_bench.py``;
  4 before the workers fetched their own bytes) with ``--s3-in-flight`` of them
  outstanding per slot (32, :data:`stages.storage.fetch.DEFAULT_IN_FLIGHT`), overlapped
  with inference, so a slot runs at the slower of compute and
  ``in_flight / (requests x latency)``;
* per-run fixed cost: the measured cold one-off (worker start, TensorFlow import,
  model build) plus the listing of the input.

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
import math
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
CORE_NODES = (2, 4, 8, 16)
TYPES = ("m5.large", "m5.xlarge", "m5.2xlarge", "c5.xlarge", "r5.xlarge")
PRICE_SOURCE = (
    "on-demand Linux EC2 + Amazon EMR uplift, Europe (Paris) eu-west-3, USD/hour, 2024 list "
    "prices as recalled from aws.amazon.com/ec2/pricing/on-demand and aws.amazon.com/emr/pricing;"
    " NOT fetched (no network here): check before quoting"
)


@dataclass(frozen=True)
class NodeType:
    """What the model needs of an instance type."""

    name: str
    vcpu: int
    memory_gib: int
    ec2_usd: float
    emr_usd: float
    slots: int  # concurrent featurize tasks (Python workers) per node
    threads_per_slot: int


def node_types() -> Tuple[Dict[str, NodeType], str]:
    """The instance table: ``cluster.sizing``'s instance types and executor layout."""
    from cluster import sizing

    out = {}
    for name in TYPES:
        it = sizing.INSTANCE_TYPES[name]
        lay = sizing.executor_layout(name)
        out[name] = NodeType(
            name, it.vcpu, it.memory_gib, it.ec2_usd, it.emr_usd, lay.executors_per_node,
            lay.task_cpus,
        )  # fmt: skip
    return out, "cluster.sizing.INSTANCE_TYPES + executor_layout"


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


def plan_row(
    nt: NodeType, core_nodes: int, images: int, rate: float, fixed_s: float, args
) -> Dict[str, Any]:
    """Time and cost of one featurize run of ``images`` on ``core_nodes`` nodes of ``nt``."""
    slots = max(1, core_nodes * nt.slots - 1)  # the driver's container takes one
    per_slot_compute = rate * nt.threads_per_slot * args.efficiency
    per_photo_ms = args.s3_get_ms * args.s3_requests_per_photo
    per_slot_s3 = 1000.0 * args.s3_in_flight / per_photo_ms if per_photo_ms > 0 else math.inf
    per_slot = min(per_slot_compute, per_slot_s3)
    cluster_rate = slots * per_slot
    # Fewer images than slots cannot use them all; tasks are image batches of 64.
    busy = min(slots, max(1, math.ceil(images / 64)))
    listing_s = images / args.list_per_s
    job_s = fixed_s + listing_s + images / (busy * per_slot)
    billed_s = max(60.0, args.startup_min * 60 + job_s)
    nodes = 1 + core_nodes
    usd = billed_s / 3600 * nodes * (nt.ec2_usd + nt.emr_usd)
    return {
        "type": nt.name,
        "core_nodes": core_nodes,
        "slots": slots,
        "img_s": cluster_rate,
        "s3_bound": per_slot_s3 < per_slot_compute,
        "images": images,
        "job_s": job_s,
        "total_s": billed_s,
        "usd": usd,
        "usd_per_hour": nodes * (nt.ec2_usd + nt.emr_usd),
    }


def hms(seconds: float) -> str:
    """``1h02m`` / ``12m30s`` / ``45s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def time_cost(r: Dict[str, Any]) -> str:
    """A plan's cell: ``1h02m $3.45``."""
    return f"{hms(r['total_s'])} ${r['usd']:.2f}"


def model(args) -> int:
    """Print the time/cost tables and the assumptions; write JSON and a PNG."""
    types, table_source = node_types()
    inputs = throughput_inputs(args)
    rate, fixed = inputs["img_per_core_s"], inputs["fixed_s"]
    counts = IMAGE_COUNTS
    rows = [
        plan_row(types[t], n, images, rate, fixed, args)
        for t in TYPES
        for n in CORE_NODES
        for images in counts
    ]
    assumptions = [
        f"per-core throughput {rate:.1f} img/s ({inputs['source']})",
        f"fixed per run {fixed:.0f} s (cold one-off: driver conversion, workers, model build)",
        f"cluster start-up {args.startup_min:g} min, billed; per-second billing, 1 min minimum",
        f"per-node efficiency {args.efficiency:g} (NodeManager, DataNode, OS)",
        f"S3 first-byte latency {args.s3_get_ms:g} ms a request, "
        f"{args.s3_requests_per_photo:g} request(s) a photo, {args.s3_in_flight} in flight a slot, "
        "overlapped with inference",
        f"listing {args.list_per_s:g} objects/s",
        f"instance table: {table_source}; prices: {PRICE_SOURCE}",
        "primary node: same type as the core nodes, billed; slots = nodes x Python workers"
        " per node - 1 (the driver's container)",
    ]
    print("Assumptions (check them):")
    for a in assumptions:
        print("  - " + a)
    print()
    headers = [
        "type",
        "core nodes",
        "slots",
        "USD/h",
        "img/s",
        *[f"{n:.0e} images" for n in counts],
    ]
    body = []
    for t in TYPES:
        for n in CORE_NODES:
            cells = [r for r in rows if r["type"] == t and r["core_nodes"] == n]
            body.append(
                [
                    t,
                    n,
                    cells[0]["slots"],
                    cells[0]["usd_per_hour"],
                    cells[0]["img_s"],
                    *[time_cost(c) for c in cells],
                ]
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
                f"{cheap['type']} x{cheap['core_nodes']}",
                time_cost(cheap),
                f"{fast['type']} x{fast['core_nodes']}",
                time_cost(fast),
            ]
        )
    tables.append(table(["images", "cheapest", "time / cost", "fastest", "time / cost"], best))
    if any(r["s3_bound"] for r in rows):
        tables.append(
            f"note: at {rate:.1f} img/s per core and {args.s3_get_ms:g} ms per S3 GET, slots of "
            + ", ".join(sorted({r["type"] for r in rows if r["s3_bound"]}))
            + " wait on S3, not the model"
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
            "s3_requests_per_photo": args.s3_requests_per_photo,
            "s3_in_flight": args.s3_in_flight,
            "list_per_s": args.list_per_s,
        },
        "node_types": {k: vars(v) for k, v in types.items()},
        "rows": rows,
    }
    path = write_results(stem, data, tables)
    plot(rows, RESULTS_DIR / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    """Cost against time for every configuration, at 1e6 and 1e7 images."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    markers = dict(zip(TYPES, "osD^v"))
    for ax, images in zip(axes, (1_000_000, 10_000_000)):
        for t in TYPES:
            pts = [r for r in rows if r["type"] == t and r["images"] == images]
            ax.plot(
                [r["total_s"] / 3600 for r in pts],
                [r["usd"] for r in pts],
                marker=markers[t],
                label=t,
            )
            for r in pts:
                ax.annotate(str(r["core_nodes"]), (r["total_s"] / 3600, r["usd"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("hours (start-up included)")
        ax.set_ylabel("USD (assumed prices)")
        ax.set_title(f"{images:.0e} images (labels: core nodes)")
        ax.legend(fontsize=8)
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
        "--fixed-s", type=float, default=None, help="per-run fixed s (default: measured)"
    )
    p.add_argument("--startup-min", type=float, default=8.0)
    p.add_argument("--efficiency", type=float, default=0.9)
    p.add_argument("--s3-get-ms", type=float, default=15.0)
    p.add_argument(
        "--s3-requests-per-photo", type=float, default=1.0,
        help="S3 requests a photo costs (1 GET, measured by s3_bench.py; 4 before)",
    )  # fmt: skip
    p.add_argument(
        "--s3-in-flight", type=int, default=32, help="requests outstanding per slot (1 before)"
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
