"""The one SparkSession builder: sane local defaults, the cluster's settings win.

Environment variables (all optional):

``FRUITS_SPARK_MASTER``     master when not launched by spark-submit (default ``local[*]``;
                            local masters get task retries: ``local[*,4]``)
``FRUITS_DRIVER_MEMORY``    driver heap when not set by spark-submit (default ``4g``; Spark's
                            1 GB default died of Java heap on 50k x 1280 features)
``FRUITS_SPARK_UI``         ``0`` turns the web UI off (tests do)
``FRUITS_JVM_JIT``          ``c1`` (default) or ``full``: the local JVM's JIT compilers (below)
``FRUITS_JVM_CDS``          ``0`` turns off the local JVM's class archive
                            (:mod:`stages.base.jvm_archive`; commands only)
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional

from stages.base.cache import cache_root
from stages.base.errors import UsageError
from stages.base.jvm_archive import archive_options
from stages.base.s3a import needs_s3a, s3a_conf

logger = logging.getLogger(__name__)

__all__ = ["cli_session", "spark_session", "with_retries", "LOCAL_DEFAULTS"]

LOCAL_DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
    # Keep one Python worker (and its model) alive across tasks.
    "spark.python.worker.reuse": "true",
    "spark.sql.parquet.compression.codec": "snappy",
}


LOCAL_TASK_ATTEMPTS = 4  # as YARN's spark.task.maxFailures on EMR

# A JVM we start ourselves (local runs) compiles with C1 only: its C2 compilations cost
# more CPU than they save in a job of thousands of photos, where the JVM only moves
# bytes (featurize, 5000 photos: benchmarks/README.md).  spark-submit's JVMs (EMR) and
# their executors keep the full JIT.
C1_ONLY = "-XX:TieredStopAtLevel=1"


def _jit() -> str:
    """``FRUITS_JVM_JIT``: ``c1`` (default) or ``full``."""
    value = os.environ.get("FRUITS_JVM_JIT", "c1").strip().lower()
    if value not in ("c1", "full"):
        raise UsageError(f"FRUITS_JVM_JIT={value!r}: use c1 or full")
    return value


def with_retries(master: str) -> str:
    """``local`` and ``local[N]`` with task retries: ``local[N,4]``.

    Local mode runs each task once by default, so one Python worker killed (by the
    OOM killer, say) failed the whole job; on a cluster Spark retries it.  A master
    that already says how many failures to allow, or is not local, is kept.
    """
    m = re.fullmatch(r"local(?:\[(\d+|\*)\])?", master.strip())
    if not m:
        return master
    return f"local[{m.group(1) or 1},{LOCAL_TASK_ATTEMPTS}]"


def _utf8_locale_for_the_jvm() -> None:
    """Make the JVM about to start read file names as UTF-8 whatever the user's locale.

    Java takes its file-name encoding from the locale at start-up: under ``LC_ALL=C``
    it cannot even spell ``Pêche/``, and Spark skipped 21 of 31 such photos.  Python
    itself already uses UTF-8 there (PEP 538/540).  Only the environment the JVM and
    its Python workers inherit is changed, and only when the locale is not UTF-8.
    """
    name = ""
    for var in ("LC_ALL", "LC_CTYPE", "LANG"):
        if os.environ.get(var):
            name = os.environ[var]
            break
    charset = name.split(".", 1)[1].split("@", 1)[0] if "." in name else ""
    try:
        utf8 = bool(charset) and codecs.lookup(charset).name == "utf-8"
    except LookupError:
        utf8 = False
    if not utf8:
        os.environ["LC_ALL"] = "C.UTF-8"


def spark_session(
    app_name: str = "fruits-pipeline",
    master: Optional[str] = None,
    conf: Optional[Mapping[str, str]] = None,
    log_file: Optional[str] = None,
    console_log: bool = True,
    class_archive: bool = False,
):
    """Get or create the SparkSession.

    Under ``spark-submit`` (EMR steps) the master, memory and every setting given
    there win; otherwise we start local mode with the defaults above. ``conf``
    entries are applied last.

    Parameters
    ----------
    app_name : str
    master : str, optional
        Overrides ``FRUITS_SPARK_MASTER`` and ``local[*]``.
    conf : mapping, optional
        Extra Spark settings.
    log_file : str, optional
        File that receives Spark's warnings and errors with their Java traces.
    console_log : bool
        False keeps Spark's log off the console (the CLI, unless ``--debug``).
    class_archive : bool
        A local JVM maps (or dumps) the class archive of :mod:`stages.base.jvm_archive`
        (the CLI's commands; the caller calls ``finish_archive`` when done).

    Returns
    -------
    pyspark.sql.SparkSession
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Launched by spark-submit: its JVM is up, but SparkConf() only sees the
        # settings given there (master, memory) once the gateway is open.
        SparkContext._ensure_initialized()
    _utf8_locale_for_the_jvm()
    existing = SparkConf()  # loads spark-submit's settings when launched by it
    if not existing.contains("spark.master"):
        # Local runs: Python workers use this interpreter (its venv), not the first
        # python3 on PATH.  On EMR, the spark-env classification sets PYSPARK_PYTHON.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(with_retries(master))
    elif not existing.contains("spark.master"):
        builder = builder.master(with_retries(os.environ.get("FRUITS_SPARK_MASTER", "local[*]")))
    if not existing.contains("spark.driver.memory"):
        builder = builder.config("spark.driver.memory", _default_driver_memory())
    if not existing.contains("spark.driver.extraJavaOptions"):
        log4j = Path(__file__).with_name("log4j2.properties")
        # Quoted: Spark splits these options on spaces, and paths may hold some.
        options = [f'"-Dlog4j.configurationFile=file:{log4j}"']
        if not existing.contains("spark.master") and _jit() == "c1":
            options.append(C1_ONLY)
        if log_file:
            options.append(f'"-Dfruits.log.file={log_file}"')
        if not console_log:
            options.append("-Dfruits.console.level=off")
        # Only for a JVM this call starts: a running one keeps its options.
        if class_archive and SparkContext._gateway is None:
            options += _archive_options(conf or {})
        builder = builder.config("spark.driver.extraJavaOptions", " ".join(options))
    for key, value in LOCAL_DEFAULTS.items():
        if not existing.contains(key):
            builder = builder.config(key, value)
    if not existing.contains("spark.master"):
        # One BLAS thread per task in local mode: two Python workers each running
        # a 2-thread GEMM on 2 cores would fight (PySpark sets this on clusters
        # from spark.executor.cores).
        cpus = (conf or {}).get("spark.task.cpus", "1")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            builder = builder.config(f"spark.executorEnv.{var}", cpus)
    if os.environ.get("FRUITS_SPARK_UI") == "0":
        builder = builder.config("spark.ui.enabled", "false")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


_PATH_ARGS = ("input", "output", "features", "results")


def _default_driver_memory() -> str:
    return os.environ.get("FRUITS_DRIVER_MEMORY", "4g")


def _archive_options(conf: Mapping[str, str]) -> list:
    """The class archive's JVM options, unless the caller sets the JVM's options."""
    if "spark.driver.extraJavaOptions" in conf:
        return []  # they replace ours: no archive option would reach the JVM
    memory = conf.get("spark.driver.memory") or _default_driver_memory()
    return archive_options(cache_root(), conf, memory)


def cli_session(args, app: str):
    """The SparkSession of a ``fruits-pipeline`` command, from its parsed arguments:
    ``--master``, ``--conf``, ``--quiet`` and ``--debug``, the s3a settings its paths
    need, and its log file."""

    # Spark's console bar would be printed into our lines: stages.base.progress shows ours.
    conf = {"spark.ui.showConsoleProgress": "false"}
    if needs_s3a(getattr(args, name, None) for name in _PATH_ARGS):
        conf.update(s3a_conf())
    conf.update(dict(getattr(args, "conf", None) or []))
    # Keys only: a --conf value may be a secret (an S3 key), and the log file stays.
    master = args.master or "default"
    logger.debug("spark: %s, master %s, settings %s", app, master, ", ".join(sorted(conf)))
    return spark_session(
        app,
        master=args.master,
        conf=conf,
        log_file=getattr(args, "log_file", None),
        console_log=bool(getattr(args, "debug", False)),
        class_archive=True,
    )
