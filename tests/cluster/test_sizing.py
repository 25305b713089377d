"""cluster.sizing: executor layout and prices per instance type (pure, no AWS, no boto3)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from cluster import sizing
from stages.base.errors import UsageError
from tests.conftest import ROOT


@pytest.mark.parametrize("engine", ["litert", "keras"])
@pytest.mark.parametrize("instance_type", sorted(sizing.INSTANCE_TYPES))
def test_layout_fills_yarn_memory_and_every_core(instance_type, engine):
    it = sizing.INSTANCE_TYPES[instance_type]
    lay = sizing.executor_layout(instance_type, engine)
    assert lay.instance_type == instance_type and lay.engine == engine
    assert lay.cores == lay.task_cpus  # one Python worker per executor
    assert lay.executors_per_node * lay.task_cpus == it.vcpu  # no idle core
    assert lay.executors_per_node * lay.container_mib <= it.yarn_mib
    assert lay.heap_mib + lay.overhead_mib == lay.container_mib
    assert lay.overhead_mib - sizing.JVM_OVERHEAD_MIB == lay.python_mib
    assert lay.python_mib == {"litert": 768, "keras": 2048}[engine]
    assert lay.heap_mib >= sizing.MIN_HEAP_MIB
    # the driver's container is whole executor slots, with room for the TFLite conversion
    driver = lay.driver_heap_mib + lay.driver_overhead_mib
    assert driver == lay.driver_slots * lay.container_mib
    assert lay.driver_overhead_mib - sizing.JVM_OVERHEAD_MIB >= sizing.DRIVER_PYTHON_MIB
    assert lay.driver_heap_mib >= sizing.MIN_HEAP_MIB


def test_litert_workers_fit_where_keras_workers_do_not():
    # 8 GiB, 4 vCPU: r5.xlarge and m5.xlarge run 4 either way; with LiteRT the executor
    # heap gets what the Keras worker held.
    lite, keras = sizing.executor_layout("m5.xlarge"), sizing.executor_layout("m5.xlarge", "keras")
    assert lite.executors_per_node == keras.executors_per_node == 4
    assert lite.heap_mib - keras.heap_mib == 2048 - 768
    with pytest.raises(UsageError, match="unknown --engine 'onnx'"):
        sizing.executor_layout("m5.large", "onnx")


def test_unknown_instance_type_names_the_table():
    with pytest.raises(UsageError, match="'t2.micro' is not in the sizing table: use one of m5"):
        sizing.executor_layout("t2.micro")
    with pytest.raises(UsageError, match="'m8g.large' is not in the sizing table"):
        sizing.find_instance_type("m8g.large")


def test_graviton_rows_are_aarch64_and_cheaper_than_their_x86_twins():
    # the same vCPU and memory as the m5/c5/r5 row of the same size, at a lower price
    twins = {
        "m7g.xlarge": "m5.xlarge",
        "m6g.xlarge": "m5.xlarge",
        "m6g.large": "m5.large",
        "c7g.xlarge": "c5.xlarge",
        "r7g.xlarge": "r5.xlarge",
        "m7g.large": "m5.large",
        "m7g.2xlarge": "m5.2xlarge",
    }
    for arm, x86 in twins.items():
        a, b = sizing.INSTANCE_TYPES[arm], sizing.INSTANCE_TYPES[x86]
        assert (a.arch, b.arch) == ("aarch64", "x86_64")
        assert (a.vcpu, a.memory_gib, a.yarn_mib, a.ebs_gib) == (
            b.vcpu, b.memory_gib, b.yarn_mib, b.ebs_gib
        )  # fmt: skip
        assert a.ec2_usd + a.emr_usd < b.ec2_usd + b.emr_usd
        assert sizing.executor_layout(arm) == dataclasses.replace(
            sizing.executor_layout(x86), instance_type=arm
        )


def test_sizing_imports_neither_the_request_builder_nor_boto3():
    # The layers point one way: cluster.spec imports cluster.sizing, never the reverse.
    code = (
        "import sys, cluster.sizing; "
        "print(' '.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('cluster', 'boto3', 'botocore', 'pyspark'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cluster", "cluster.sizing"]
