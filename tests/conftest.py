"""Shared fixtures: one SparkSession (local[2]) for the whole test session, and the
bundled sample featurized once."""

from __future__ import annotations

import glob
import importlib.util
import os
import stat
import subprocess
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "fruits360"
SHARED_DATA = ROOT.parent / "shared" / "data" / "fruits360"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["FRUITS_SPARK_UI"] = "0"


def s3a_jars() -> List[str]:
    """Hadoop's S3A connector jars shipped by the PyPI package sagemaker_pyspark
    (tests only; on EMR, s3:// goes through EMRFS). Found without importing it."""
    spec = importlib.util.find_spec("sagemaker_pyspark")
    if spec is None or spec.origin is None:
        return []
    jars = os.path.join(os.path.dirname(spec.origin), "jars")
    wanted = ["hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar"]
    found = [j for w in wanted for j in glob.glob(os.path.join(jars, w))]
    return found if len(found) == len(wanted) else []


@pytest.fixture(scope="session", autouse=True)
def tflite_cache(tmp_path_factory):
    """A fresh driver-side TFLite conversion cache for the session (and its subprocesses)."""
    path = tmp_path_factory.mktemp("fruits_cache")
    old = os.environ.get("FRUITS_CACHE")
    os.environ["FRUITS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FRUITS_CACHE", None)
    else:
        os.environ["FRUITS_CACHE"] = old


@pytest.fixture(scope="session")
def keras_home(tmp_path_factory):
    """An empty, read-only KERAS_HOME given to every Python worker: featurizing must
    never need it (weights come by broadcast).  Root ignores mode bits, so the folder
    is also made immutable where ``chattr`` allows it."""
    home = tmp_path_factory.mktemp("keras_home_readonly")
    home.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    immutable = subprocess.run(["chattr", "+i", str(home)], capture_output=True).returncode == 0
    yield home
    if immutable:
        subprocess.run(["chattr", "-i", str(home)], capture_output=True)
    home.chmod(stat.S_IRWXU)


@pytest.fixture(scope="session")
def spark(keras_home):
    """The one SparkSession of the test session (local[2])."""
    from stages.session import spark_session

    conf = {
        "spark.executorEnv.KERAS_HOME": str(keras_home),
        "spark.sql.shuffle.partitions": "4",
        "spark.ui.enabled": "false",
    }
    jars = s3a_jars()
    if jars:
        conf["spark.jars"] = ",".join(jars)
    session = spark_session("fruits-pipeline-tests", master="local[2]", conf=conf)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_features(spark, tmp_path_factory) -> Path:
    """The bundled sample featurized once with the bundled weights (default engine, LiteRT)."""
    from stages.featurize import featurize

    out = tmp_path_factory.mktemp("sample") / "Features"
    featurize(spark, str(SAMPLE), str(out), weights="bundled")
    return out


@pytest.fixture(scope="session")
def keras_sample_features(spark, tmp_path_factory) -> Path:
    """The bundled sample featurized once by the Keras engine (the reference)."""
    from stages.featurize import featurize

    out = tmp_path_factory.mktemp("sample_keras") / "Features"
    featurize(spark, str(SAMPLE), str(out), weights="bundled", engine="keras")
    return out
