"""The session builder: spark-submit's settings win (EMR steps), local defaults otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
