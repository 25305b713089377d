"""What a run will take and cost before it starts, and the deadline a cost limit buys (pure).

``fruits-pipeline emr plan|up|run`` print :func:`estimate`'s lines before anything is
created; ``--max-cost`` refuses a run whose estimate is above it and turns the limit
into a termination time with :func:`deadline_seconds`.  No AWS calls, no boto3.

The model (the same as ``benchmarks/instance_sizes.py``'s): every image is read once
from S3 by one executor slot (one Python worker, one model); a slot runs at the slower
of the model (the measured per-core throughput times its threads times a node
efficiency) and S3's first-byte latency (reads overlap inference); the cluster starts
in ~8 min, billed; the reduce stage is a linear fit of the local benchmark spread over
the cluster's cores.  Every figure that is not measured here is an assumption, printed
with the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from cluster.sizing import ROOT_VOLUME_GIB, executor_layout, find_instance_type
from cluster.spec import ClusterOptions

__all__ = [
    "EBS_USD_PER_GIB_MONTH",
    "S3_GET_USD_PER_1000",
    "S3_PUT_LIST_USD_PER_1000",
    "SPOT_FRACTION",
    "THROUGHPUT",
    "Estimate",
    "Model",
    "ceiling_per_hour",
    "deadline_seconds",
    "estimate",
    "hms",
    "hourly_cost",
    "per_core_rate",
]

# Featurize img/s per executor core, Spark steady state on the 2-core development machine
# (benchmarks/results/): (engine, alpha) -> (img/s, source).  An EMR vCPU is assumed as
# fast as one of those cores, x86_64 or Graviton alike (not measured on either).
THROUGHPUT: Dict[Tuple[str, float], Tuple[float, str]] = {
    ("litert", 1.0): (145.6, "featurize_alpha1.json, 2026-12-01, steady state"),
    # alpha 0.35 ran on a loaded machine: 1000 / the Spark CPU s per 1000 images (3.04)
    ("litert", 0.35): (329.0, "featurize_v2.json, 5000 images, 1000 / CPU s per 1000 img"),
    ("keras", 1.0): (50.5, "featurize.json, 2026-11-24 (Keras engine)"),
    ("keras", 0.35): (108.0, "featurize.json, 2026-11-24 (Keras engine)"),
}
# eu-west-3 list prices as recalled (not fetched: check aws.amazon.com/ebs/pricing and
# aws.amazon.com/s3/pricing): gp3 storage per GiB-month; S3 Standard requests.
EBS_USD_PER_GIB_MONTH = 0.0928
HOURS_PER_MONTH = 730.0
S3_GET_USD_PER_1000 = 0.00042
S3_PUT_LIST_USD_PER_1000 = 0.0053
# Spot task nodes: EC2 price as a fraction of on-demand (an assumption: Spot prices move;
# `aws ec2 describe-spot-price-history` gives today's).  EMR's uplift is the same on Spot.
SPOT_FRACTION = 0.4
STARTUP_S = 480.0  # provisioning + the bootstrap's pip install of TensorFlow (~8 min)
STEP_START_S = 45.0  # spark-submit in cluster mode: YARN application, driver, workers
NODE_EFFICIENCY = 0.9  # NodeManager, DataNode and the OS take the rest of a node
S3_GET_MS = 15.0  # first-byte latency of one small object
# GETs in flight per slot: each Python worker fetches its batch's photos concurrently
# (stages.storage.fetch.DEFAULT_IN_FLIGHT), overlapped with inference.
S3_IN_FLIGHT = 32
LIST_PER_S = 10_000.0  # objects listed per second (1000 a page, ~100 ms a page)
IMAGES_PER_TASK = 2048  # the featurize stage's task size; one Parquet file each
# reduce: 118 ms per 1000 rows on local[2] (README, reduce benchmark), i.e. 0.236 core-s
REDUCE_CORE_S_PER_1000 = 0.236


@dataclass(frozen=True)
class Model:
    """The estimate's assumptions: the constants above, which ``benchmarks/instance_sizes.py``
    varies; ``img_per_core_s`` replaces the measured :data:`THROUGHPUT` when given."""

    startup_s: float = STARTUP_S
    step_start_s: float = STEP_START_S
    efficiency: float = NODE_EFFICIENCY
    s3_get_ms: float = S3_GET_MS
    s3_in_flight: int = S3_IN_FLIGHT
    list_per_s: float = LIST_PER_S
    spot_fraction: float = SPOT_FRACTION
    img_per_core_s: Optional[float] = None


def hms(seconds: float) -> str:
    """``1h02m`` / ``12m30s`` / ``45s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def hourly_cost(opts: ClusterOptions) -> Dict[str, float]:
    """USD per hour of the cluster at start, on-demand (Spot counted at on-demand).

    Returns
    -------
    dict
        ``nodes``, ``ec2_usd``, ``emr_usd``, ``ebs_usd``, ``total_usd`` (per hour).
    """
    it = find_instance_type(opts.instance_type)
    nodes = 1 + opts.core + opts.task
    return _per_hour(nodes, it.ec2_usd * nodes, it.emr_usd, _ebs_per_node_hour(opts))


def ceiling_per_hour(opts: ClusterOptions) -> float:
    """The most the cluster can cost per hour: every node it may grow to, on-demand.

    Spot is never billed above the on-demand price (EMR's default maximum), and managed
    scaling stops at ``--max-instances`` core and task nodes (plus the primary).
    """
    it = find_instance_type(opts.instance_type)
    nodes = 1 + max(opts.core + opts.task, opts.max_instances or 0)
    return nodes * (it.ec2_usd + it.emr_usd + _ebs_per_node_hour(opts))


def _ebs_per_node_hour(opts: ClusterOptions) -> float:
    it = find_instance_type(opts.instance_type)
    return (ROOT_VOLUME_GIB + it.ebs_gib) * EBS_USD_PER_GIB_MONTH / HOURS_PER_MONTH


def _per_hour(nodes: int, ec2: float, emr_per_node: float, ebs_per_node: float):
    emr, ebs = nodes * emr_per_node, nodes * ebs_per_node
    return {
        "nodes": nodes,
        "ec2_usd": round(ec2, 4),
        "emr_usd": round(emr, 4),
        "ebs_usd": round(ebs, 4),
        "total_usd": round(ec2 + emr + ebs, 4),
    }


def per_core_rate(engine: str, alpha: float) -> Tuple[float, str]:
    """Featurize img/s per core for ``engine`` at ``alpha``, and where it comes from.

    An alpha that was not measured takes the next measured alpha above it (slower:
    the estimate errs on the side of cost); above 1.0, 1.0's rate over ``alpha**2``
    (MobileNetV2's multiply-adds grow about as the square of the width).
    """
    measured = sorted(a for e, a in THROUGHPUT if e == engine)
    above = [a for a in measured if a >= alpha - 1e-9]
    if above:
        rate, source = THROUGHPUT[(engine, above[0])]
        if abs(above[0] - alpha) > 1e-9:
            source += f"; alpha {alpha:g} not measured: alpha {above[0]:g}'s rate"
        return rate, source
    rate, source = THROUGHPUT[(engine, measured[-1])]
    return rate / alpha**2, f"{source}; alpha {alpha:g}: alpha 1.0's rate / {alpha:g}^2"


@dataclass(frozen=True)
class Estimate:
    """Time and cost of one run (featurize then reduce, as ``emr run`` does)."""

    images: int
    images_source: str
    engine: str
    alpha: float
    slots: int
    slot_rate: float
    s3_bound: bool
    startup_s: float
    featurize_s: float
    reduce_s: float
    usd: Dict[str, float]
    idle_usd: float
    assumptions: List[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        """Billed wall time: start-up, both steps."""
        return self.startup_s + self.featurize_s + self.reduce_s

    @property
    def total_usd(self) -> float:
        """The sum of the items of :attr:`usd`."""
        return round(sum(self.usd.values()), 4)

    def lines(self, opts: ClusterOptions) -> List[str]:
        """The estimate as the lines ``emr plan|up|run`` print."""
        u = self.usd
        per_m = self.total_usd / self.images * 1e6 if self.images else 0.0
        nodes = 1 + opts.core + opts.task
        market = f", {opts.task} task on Spot" if opts.spot else ""
        if not self.images:
            return [
                f"estimate: start-up alone ({self.images_source}): {hms(self.startup_s)}, "
                f"{self.total_usd:.2f} USD on {nodes} x {opts.instance_type}{market}, then "
                f"{self.idle_usd / max(opts.idle_timeout, 1) * 3600:.3f} USD/h until "
                f"`emr down` or {hms(opts.idle_timeout)} idle"
            ]
        return [
            f"estimate: {self.images:,} images ({self.images_source}), {nodes} x "
            f"{opts.instance_type}{market}, featurize ({self.engine}, alpha {self.alpha}) "
            "then reduce; the cluster ends after its steps, as with `emr run`",
            f"  time: {hms(self.startup_s)} start-up + {hms(self.featurize_s)} featurize "
            f"({self.slots} slots x {self.slot_rate:.1f} img/s"
            f"{', S3-bound' if self.s3_bound else ''}) + {hms(self.reduce_s)} reduce = "
            f"{hms(self.total_s)}",
            f"  cost: EC2 {u['ec2']:.3f} + EMR {u['emr']:.3f} + EBS {u['ebs']:.3f} + S3 requests "
            f"{u['s3_requests']:.3f} = {self.total_usd:.2f} USD"
            + (f" ({per_m:.2f} USD per million images)" if self.images else "")
            + f"; a cluster from `emr up` also bills its idle timeout: +{self.idle_usd:.3f} USD",
            "  assumed: " + "; ".join(self.assumptions),
        ]


def estimate(
    opts: ClusterOptions,
    images: int,
    images_source: str,
    engine: str = "litert",
    alpha: float = 1.0,
    model: Model = Model(),
) -> Estimate:
    """Time and cost of featurizing ``images`` and reducing them on the cluster ``opts``.

    Parameters
    ----------
    opts : ClusterOptions
        Instance type, core/task nodes, Spot.  Managed scaling is not counted (the
        estimate is for the nodes asked for at start; :func:`ceiling_per_hour` is the
        most they may cost).
    images : int
        Image count (0: start-up alone, what ``emr up`` costs before any step).
    images_source : str
        How the count was found (printed).
    engine, alpha : str, float
        Featurize engine and MobileNetV2 width (EMR's default weights: alpha 1.0).
    model : Model
        The assumptions (defaults: this module's constants).
    """
    it = find_instance_type(opts.instance_type)
    lay = executor_layout(opts.instance_type, engine)
    rate, rate_source = per_core_rate(engine, alpha)
    if model.img_per_core_s:
        rate, rate_source = model.img_per_core_s, "given"
    workers = opts.core + opts.task
    slots = max(1, workers * lay.executors_per_node - lay.driver_slots)
    compute = rate * lay.task_cpus * model.efficiency
    s3_cap = 1000.0 * model.s3_in_flight / model.s3_get_ms if model.s3_get_ms > 0 else math.inf
    slot_rate = min(compute, s3_cap)
    if images:
        busy = min(slots, max(1, math.ceil(images / 64)))  # tasks are batches of >= 64
        featurize_s = model.step_start_s + images / model.list_per_s + images / (busy * slot_rate)
        cores = max(1, workers * it.vcpu - lay.driver_slots * lay.task_cpus)
        reduce_s = model.step_start_s + images / 1000 * REDUCE_CORE_S_PER_1000 / cores
    else:
        featurize_s = reduce_s = 0.0
    hours = (model.startup_s + featurize_s + reduce_s) / 3600
    nodes = 1 + workers
    spot_nodes = opts.task if opts.spot else 0
    ec2_per_h = (nodes - spot_nodes) * it.ec2_usd + spot_nodes * it.ec2_usd * model.spot_fraction
    per_h = _per_hour(nodes, ec2_per_h, it.emr_usd, _ebs_per_node_hour(opts))
    lists = math.ceil(images / 1000) * 2  # our count, and featurize's own listing
    # a Parquet file a task, and the two stages' commit files
    puts = math.ceil(images / IMAGES_PER_TASK) + 20 if images else 0
    usd = {
        "ec2": round(per_h["ec2_usd"] * hours, 4),
        "emr": round(per_h["emr_usd"] * hours, 4),
        "ebs": round(per_h["ebs_usd"] * hours, 4),
        "s3_requests": round(
            images / 1000 * S3_GET_USD_PER_1000 + (lists + puts) / 1000 * S3_PUT_LIST_USD_PER_1000,
            4,
        ),
    }
    assumptions = [
        f"{rate:.1f} img/s per core ({engine}, alpha {alpha}: {rate_source})",
        f"{model.s3_get_ms:g} ms per S3 GET, one GET per image, "
        f"{model.s3_in_flight} in flight a slot",
        f"start-up {hms(model.startup_s)} and {model.step_start_s:g} s per step",
        f"node efficiency {model.efficiency:g}",
        "prices recalled, not fetched (cluster/sizing.py, cluster/costs.py)",
    ]
    if opts.spot:
        assumptions.append(f"Spot EC2 at {model.spot_fraction:g} x on-demand")
    return Estimate(
        images=images,
        images_source=images_source,
        engine=engine,
        alpha=alpha,
        slots=slots,
        slot_rate=slot_rate,
        s3_bound=s3_cap < compute,
        startup_s=model.startup_s,
        featurize_s=featurize_s,
        reduce_s=reduce_s,
        usd=usd,
        idle_usd=round(per_h["total_usd"] * opts.idle_timeout / 3600, 4),
        assumptions=assumptions,
    )


def deadline_seconds(max_cost: float, opts: ClusterOptions, est: Optional[Estimate]) -> float:
    """Seconds after start at which the cluster has spent ``max_cost`` at the most.

    The hourly ceiling (:func:`ceiling_per_hour`: every node it may grow to, on-demand)
    into what the limit leaves after the run's S3 requests, which do not grow with time.
    """
    s3 = est.usd["s3_requests"] if est is not None else 0.0
    return max(0.0, (max_cost - s3) / ceiling_per_hour(opts) * 3600)
