"""The sizing model of an EMR node: instance types, prices, executor layout (pure Python).

What one node of an EC2 instance type can run: how many executors, how many cores and
how much memory each gets so that YARN never kills a container for its Python worker's
memory, and what the node costs per hour.  :mod:`cluster.spec` turns this into the
``run_job_flow`` request; ``benchmarks/instance_sizes.py`` into a cost table.  No AWS
calls, no boto3: this module imports only :mod:`stages.base.errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

from stages.base.errors import UsageError

__all__ = [
    "DRIVER_PYTHON_MIB",
    "INSTANCE_TYPES",
    "JVM_OVERHEAD_MIB",
    "MIN_HEAP_MIB",
    "PYTHON_WORKER_MIB",
    "ROOT_VOLUME_GIB",
    "ExecutorLayout",
    "InstanceType",
    "executor_layout",
    "find_instance_type",
]


@dataclass(frozen=True)
class InstanceType:
    """One EC2 instance type as EMR sees it.

    ``yarn_mib`` is EMR's default ``yarn.nodemanager.resource.memory-mb`` for the type
    (EMR Release Guide, "Task configuration"): what YARN may hand to containers.
    Prices are USD per hour, on-demand, Linux, eu-west-3: ``ec2_usd`` the instance,
    ``emr_usd`` EMR's uplift on top of it.  ``arch`` is the CPU architecture of the
    wheels the bootstrap installs (``x86_64``, or ``aarch64`` for Graviton); ``ebs_gib``
    the EBS data volumes EMR attaches by default to a node of the type (beside the
    32 GiB root volume the request asks for).
    """

    name: str
    vcpu: int
    memory_gib: int
    yarn_mib: int
    ec2_usd: float
    emr_usd: float
    arch: str = "x86_64"
    ebs_gib: int = 32


# Prices: ASSUMPTIONS, as recalled from the AWS pricing pages (EC2 On-Demand and Amazon
# EMR, region "Europe (Paris)"), 2024 list prices; not re-checked here (no network).
# Check https://aws.amazon.com/ec2/pricing/on-demand/ and https://aws.amazon.com/emr/pricing/
# before quoting a cost.  EC2 and the EMR uplift are billed separately, per second.
# Graviton (aarch64) rows: the recalled US East list price times 1.17, the Paris/US East
# ratio of the m5, c5 and r5 rows above; the EMR uplift is the US East one (as for those
# rows).  Also recalled, not quoted: check them, and that the type is offered in the
# region's Availability Zone, before relying on them.  ``ebs_gib``: EMR's default data
# volumes per node ("Default Amazon EBS storage for instances", EMR Management Guide, as
# recalled: 32 GiB for a large, 64 GiB for an xlarge, 128 GiB for a 2xlarge).
INSTANCE_TYPES: Dict[str, InstanceType] = {
    it.name: it
    for it in (
        InstanceType("m5.large", 2, 8, 6144, 0.112, 0.024, "x86_64", 32),
        InstanceType("m5.xlarge", 4, 16, 12288, 0.224, 0.048, "x86_64", 64),
        InstanceType("m5.2xlarge", 8, 32, 24576, 0.448, 0.096, "x86_64", 128),
        InstanceType("c5.xlarge", 4, 8, 6144, 0.202, 0.043, "x86_64", 64),
        InstanceType("r5.xlarge", 4, 32, 24576, 0.296, 0.063, "x86_64", 64),
        InstanceType("m6g.large", 2, 8, 6144, 0.0898, 0.0193, "aarch64", 32),
        InstanceType("m6g.xlarge", 4, 16, 12288, 0.1797, 0.0385, "aarch64", 64),
        InstanceType("m7g.large", 2, 8, 6144, 0.0952, 0.0204, "aarch64", 32),
        InstanceType("m7g.xlarge", 4, 16, 12288, 0.1904, 0.0408, "aarch64", 64),
        InstanceType("m7g.2xlarge", 8, 32, 24576, 0.3808, 0.0816, "aarch64", 128),
        InstanceType("c7g.xlarge", 4, 8, 6144, 0.1692, 0.0363, "aarch64", 64),
        InstanceType("r7g.xlarge", 4, 32, 24576, 0.2499, 0.0536, "aarch64", 64),
    )
}

# The root volume of every node (the request's EbsRootVolumeSize): pip's TensorFlow adds
# ~1.5 GB to it, more than EMR's default 15 GiB leaves free.
ROOT_VOLUME_GIB = 32

# Memory of one Python worker, per featurize engine (stages.featurize.engine), from measured
# peaks
# (benchmarks/README.md) plus margin.  LiteRT: the interpreter and batches of 4, peak RSS
# ~0.3 GB at alpha 1.0.  Keras: ~0.6 GB after building MobileNetV2, peaking near 1.9 GB
# with alpha 1.0 and batches of 64.
PYTHON_WORKER_MIB: Dict[str, int] = {"litert": 768, "keras": 2048}
# The Python driver converts the Keras model to TFLite for --weights imagenet/.h5/random
# (TensorFlow import + build + conversion: 1.06 GB peak RSS at alpha 1.0, measured).
DRIVER_PYTHON_MIB = 1536
# Spark's floor for memoryOverhead: JVM off-heap, netty, Arrow buffers of mapInArrow.
JVM_OVERHEAD_MIB = 384
# Executor heap floor: Spark refuses < 450 MiB; 640 MiB leaves ~200 MiB of unified
# memory for the binaryFile rows in flight and the Parquet writer of ~5 KB feature rows.
MIN_HEAP_MIB = 640


@dataclass(frozen=True)
class ExecutorLayout:
    """How Spark's executors fill one node of an instance type.

    One task, hence one Python worker (and one model), per executor: ``cores`` equals
    ``task_cpus``, the threads TensorFlow gets (``stages.featurize.frame`` reads
    ``TaskContext.cpus()``).  The driver, which runs in a YARN container on a core node
    in cluster deploy mode, is sized like one executor so it displaces exactly one.
    """

    instance_type: str
    executors_per_node: int
    cores: int
    task_cpus: int
    container_mib: int
    heap_mib: int
    overhead_mib: int
    python_mib: int
    engine: str = "litert"
    driver_heap_mib: int = MIN_HEAP_MIB
    driver_overhead_mib: int = JVM_OVERHEAD_MIB + DRIVER_PYTHON_MIB
    driver_slots: int = 1


def find_instance_type(name: str) -> InstanceType:
    """The row of :data:`INSTANCE_TYPES` for ``name``.

    Raises
    ------
    UsageError
        ``name`` is not in the table.
    """
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        raise UsageError(
            f"--instance-type {name!r} is not in the sizing table: use one of "
            f"{', '.join(INSTANCE_TYPES)}"
        ) from None


def executor_layout(instance_type: str, engine: str = "litert") -> ExecutorLayout:
    """Size executors so YARN never kills a container for its Python worker's memory.

    ``engine`` is the featurize engine the cluster is sized for: a LiteRT worker needs
    a third of a Keras worker's memory, so memory-bound types run more of them.  The
    driver's container (a YARN container on a core node in cluster deploy mode) holds
    the TFLite conversion; it takes ``driver_slots`` executors' room.

    Python memory is counted in ``spark.executor.memoryOverhead`` rather than
    ``spark.executor.pyspark.memory``: the latter sets ``RLIMIT_AS`` on each worker, a
    cap on *virtual* memory, and TensorFlow maps about twice its resident size (3.0 GB
    virtual for 1.6 GB resident after one alpha-1.0 batch, measured), so the cap would
    kill a worker that YARN would have let live.

    Raises
    ------
    UsageError
        Unknown instance type, or one too small for a single Python worker.
    """
    it = find_instance_type(instance_type)
    if engine not in PYTHON_WORKER_MIB:
        raise UsageError(f"unknown --engine {engine!r}: use {' or '.join(PYTHON_WORKER_MIB)}")
    python = PYTHON_WORKER_MIB[engine]
    slot_min = MIN_HEAP_MIB + JVM_OVERHEAD_MIB + python
    fit = min(it.vcpu, it.yarn_mib // slot_min)
    if fit < 1:  # pragma: no cover - every type in the table fits one
        raise UsageError(f"{instance_type} has too little YARN memory for one Python worker")
    # A divisor of the vCPUs, so no core idles: memory-bound types (c5) give each
    # worker more threads instead.
    workers = max(w for w in range(1, fit + 1) if it.vcpu % w == 0)
    task_cpus = it.vcpu // workers
    container = (it.yarn_mib // workers) // 128 * 128
    overhead = JVM_OVERHEAD_MIB + python
    driver_overhead = JVM_OVERHEAD_MIB + DRIVER_PYTHON_MIB
    driver_slots = math.ceil((MIN_HEAP_MIB + driver_overhead) / container)
    return ExecutorLayout(
        instance_type=it.name,
        executors_per_node=workers,
        cores=task_cpus,
        task_cpus=task_cpus,
        container_mib=container,
        heap_mib=container - overhead,
        overhead_mib=overhead,
        python_mib=python,
        engine=engine,
        driver_heap_mib=driver_slots * container - driver_overhead,
        driver_overhead_mib=driver_overhead,
        driver_slots=driver_slots,
    )
