"""The ``Configurations`` of the EMR request: Python 3.11, Spark's executor layout, Livy.

The classifications ``spark-env``/``spark-defaults`` (every step) and, with
``--notebook``, ``jupyter-s3-conf``, ``livy-conf``, ``livy-env`` and
``jupyter-sparkmagic-conf``, from :func:`cluster.sizing.executor_layout` (pure).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from cluster.sizing import executor_layout

__all__ = [
    "LIVY_SESSION_TIMEOUT",
    "PYTHON",
    "configurations",
    "livy_session_configs",
    "spark_defaults",
]

# EMR 7.6.0 runs PySpark on Python 3.9 by default; the bootstrap installs our libraries
# for 3.11, and the spark-env classification points Spark at it.
PYTHON = "/usr/bin/python3.11"
# Livy ends a notebook session idle this long.  An open session is a running YARN
# application, and EMR never counts a cluster with one as idle: without this limit a
# forgotten notebook would keep the cluster (and the bill) alive past its idle timeout.
LIVY_SESSION_TIMEOUT = "1h"


def spark_defaults(instance_type: str, engine: str = "litert") -> Dict[str, str]:
    """The ``spark-defaults`` classification for core/task nodes of ``instance_type``."""
    lay = executor_layout(instance_type, engine)
    return {
        "spark.executor.cores": str(lay.cores),
        "spark.task.cpus": str(lay.task_cpus),
        "spark.executor.memory": f"{lay.heap_mib}m",
        "spark.executor.memoryOverhead": f"{lay.overhead_mib}m",
        "spark.driver.cores": "1",
        "spark.driver.memory": f"{lay.driver_heap_mib}m",
        # the Python driver imports TensorFlow, builds the model and converts it
        "spark.driver.memoryOverhead": f"{lay.driver_overhead_mib}m",
        "spark.pyspark.python": PYTHON,
        "spark.pyspark.driver.python": PYTHON,
        # one model build per worker, not per task (8x slower without, measured)
        "spark.python.worker.reuse": "true",
        # binaryFile packs ~30 small JPEGs per 4 MB split by default: far too few tasks
        "spark.sql.files.openCostInBytes": "65536",
        # managed scaling needs it; a longer idle timeout keeps executors (and their
        # models) between the jobs of one step
        "spark.dynamicAllocation.enabled": "true",
        "spark.dynamicAllocation.executorIdleTimeout": "300s",
        # a second driver attempt would redo an hour of featurizing, then fail on the
        # existing output: fail once, clearly
        "spark.yarn.maxAppAttempts": "1",
    }


def configurations(
    instance_type: str, engine: str = "litert", notebook_bucket: Optional[str] = None
) -> List[Dict[str, Any]]:
    """The ``Configurations`` of the request: Python 3.11, Spark sizing, notebooks.

    ``notebook_bucket``: with JupyterHub and Livy (``--notebook``), the bucket that
    keeps the notebooks.
    """
    confs: List[Dict[str, Any]] = [
        {
            "Classification": "spark-env",
            "Properties": {},
            "Configurations": [
                {
                    "Classification": "export",
                    "Properties": {"PYSPARK_PYTHON": PYTHON, "PYSPARK_DRIVER_PYTHON": PYTHON},
                }
            ],
        },
        {
            "Classification": "spark-defaults",
            "Properties": spark_defaults(instance_type, engine),
        },
    ]
    if notebook_bucket:
        confs += [
            # JupyterHub saves notebooks to s3://B/jupyter/<user>/, not the primary's disk.
            {
                "Classification": "jupyter-s3-conf",
                "Properties": {
                    "s3.persistence.enabled": "true",
                    "s3.persistence.bucket": notebook_bucket,
                },
            },
            # Livy's PySpark sessions: the driver in a YARN container on a core node (as a
            # step's), not on the primary beside JupyterHub, YARN and HDFS daemons.
            {
                "Classification": "livy-conf",
                "Properties": {
                    "livy.spark.deploy-mode": "cluster",
                    "livy.server.session.timeout-check": "true",
                    "livy.server.session.timeout": LIVY_SESSION_TIMEOUT,
                },
            },
            # Livy starts the session's Python from spark.pyspark.python, else from
            # PYSPARK_PYTHON: the 3.11 the bootstrap installed the project into.
            {
                "Classification": "livy-env",
                "Properties": {},
                "Configurations": [
                    {
                        "Classification": "export",
                        "Properties": {"PYSPARK_PYTHON": PYTHON, "PYSPARK_DRIVER_PYTHON": PYTHON},
                    }
                ],
            },
            {
                "Classification": "jupyter-sparkmagic-conf",
                "Properties": {
                    "session_configs": json.dumps(
                        livy_session_configs(instance_type, engine), sort_keys=True
                    )
                },
            },
        ]
    return confs


def livy_session_configs(instance_type: str, engine: str = "litert") -> Dict[str, Any]:
    """Sparkmagic's ``session_configs``: what every PySpark kernel asks Livy for.

    Sparkmagic sends its own defaults with each new session (``driverMemory`` 1000M,
    ``executorCores`` 2), and they override ``spark-defaults``.  Two cores would put two
    Python workers, two TensorFlow models, in an executor sized for one, and YARN would
    kill it in the middle of a featurize.  So the session asks for exactly the layout of
    :func:`spark_defaults`: the driver sized like a step's (the model is built once in
    its Python process, inside the container's overhead), one Python worker per
    executor, and Python 3.11 on the driver (``spark.yarn.appMasterEnv``, cluster mode)
    and the executors.
    """
    d = spark_defaults(instance_type, engine)  # one layout: the steps' and the kernel's
    keys = ("spark.driver.memoryOverhead", "spark.executor.memoryOverhead", "spark.task.cpus")
    return {
        "driverMemory": d["spark.driver.memory"],
        "driverCores": int(d["spark.driver.cores"]),
        "executorMemory": d["spark.executor.memory"],
        "executorCores": int(d["spark.executor.cores"]),
        "conf": {
            **{k: d[k] for k in keys},
            "spark.pyspark.python": d["spark.pyspark.python"],
            "spark.pyspark.driver.python": d["spark.pyspark.driver.python"],
            "spark.yarn.appMasterEnv.PYSPARK_PYTHON": d["spark.pyspark.python"],
        },
    }
