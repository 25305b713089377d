"""The session builder: spark-submit's settings win (EMR steps), local defaults otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stages.base.errors import UsageError
from stages.base.session import C1_ONLY, _jit
from tests.conftest import ROOT


@pytest.mark.slow
def test_spark_submit_master_and_memory_win(tmp_path):
    # Regression: SparkConf() before the gateway opened was empty, so an EMR step's
    # spark-submit settings were replaced by local[*] and 4g.
    from pyspark.find_spark_home import _find_spark_home

    script = tmp_path / "probe.py"
    script.write_text(
        "from stages.base.session import spark_session\n"
        "s = spark_session()\n"
        "conf = s.sparkContext.getConf()\n"
        "print('PROBE', s.sparkContext.master, conf.get('spark.driver.memory'))\n"
    )
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            f"{_find_spark_home()}/bin/spark-submit",
            "--master",
            "local[1]",
            "--driver-memory",
            "700m",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PROBE local[1] 700m" in proc.stdout


def test_local_defaults(spark):
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.sql.session.timeZone") == "UTC"
    # 4g (not Spark's 1g) unless FRUITS_DRIVER_MEMORY says otherwise for this run.
    assert conf.get("spark.driver.memory") == os.environ.get("FRUITS_DRIVER_MEMORY", "4g")
    assert conf.get("spark.python.worker.reuse") == "true"
    # The JVM we start compiles with C1 only (unless FRUITS_JVM_JIT=full for this run),
    # and the JVM itself took the flag.
    c1 = os.environ.get("FRUITS_JVM_JIT", "c1") == "c1"
    assert (C1_ONLY in conf.get("spark.driver.extraJavaOptions")) == c1
    args = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    assert (C1_ONLY in list(args.getInputArguments())) == c1


def test_jvm_jit_setting(monkeypatch):
    monkeypatch.delenv("FRUITS_JVM_JIT", raising=False)
    assert _jit() == "c1"
    monkeypatch.setenv("FRUITS_JVM_JIT", " Full ")
    assert _jit() == "full"
    monkeypatch.setenv("FRUITS_JVM_JIT", "c2")
    with pytest.raises(UsageError, match="FRUITS_JVM_JIT='c2': use c1 or full"):
        _jit()
