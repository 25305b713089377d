"""Shared fixtures: one SparkSession (local[2]) for the whole test session, and the
bundled sample featurized once."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Tuple

import pytest
from hypothesis import settings

# `make test` (and CI) draws the same examples on every run, so a red run is reproducible
# and never a new draw's luck; `make test-explore` draws new ones to hunt for bugs.
# No deadline: a loaded machine's pause is not a property's failure.
settings.register_profile("repeatable", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "fruits360"
SHARED_DATA = ROOT.parent / "shared" / "data" / "fruits360"

# The EMR bootstrap is a bash script: its tests run it (or `bash -n` it) where bash is.
needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None,
    reason="the EMR bootstrap is a bash script and this machine has no bash to run it",
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["FRUITS_SPARK_UI"] = "0"
# The CLI's run logs go to a throw-away folder, not the developer's ~/.cache.
os.environ["FRUITS_LOG_DIR"] = tempfile.mkdtemp(prefix="fruits-test-logs-")
atexit.register(shutil.rmtree, os.environ["FRUITS_LOG_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the JVM (the ``spark`` fixture, directly or through
    another fixture) ``jvm``, so ``make test-fast`` can leave them out."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.jvm)


def s3a_jars() -> List[str]:
    """Hadoop's S3A connector jars (:mod:`stages.base.s3a`), or [] where they are missing."""
    from stages.base.errors import UsageError
    from stages.base.s3a import find_jars

    try:
        return find_jars()
    except UsageError:
        return []


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
    from stages.base.session import spark_session

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


def leave_out(source: Path, dest: Path, classes: int = 10) -> List[Tuple[Path, str]]:
    """Copy ``source``'s ``<Class>/*.jpg`` to ``dest`` except one photo in each of
    ``classes`` classes spread over the alphabet; returns the left-out (photo, class)."""
    names = sorted(p.name for p in source.iterdir() if p.is_dir())
    step = max(1, len(names) // classes)
    chosen = set(names[::step][:classes])
    left: List[Tuple[Path, str]] = []
    for name in names:
        photos = sorted((source / name).glob("*.jpg"))
        (dest / name).mkdir(parents=True)
        out = photos[len(photos) // 2] if name in chosen else None
        for photo in photos:
            if photo == out:
                left.append((photo, name))
            else:
                shutil.copyfile(photo, dest / name / photo.name)
    return left


def left_out_results(spark, source: Path, tmp: Path) -> Tuple[Path, List[Tuple[Path, str]]]:
    """RESULTS (with its index) of ``source`` less 10 photos, and those photos."""
    from stages.featurize import featurize
    from stages.reduce import reduce_features

    left = leave_out(source, tmp / "Images")
    featurize(spark, str(tmp / "Images"), str(tmp / "Features"), weights="bundled")
    reduce_features(spark, str(tmp / "Features"), str(tmp / "Results"), variance=0.95)
    return tmp / "Results", left


@pytest.fixture(scope="session")
def sample_left_out(spark, tmp_path_factory) -> Tuple[Path, List[Tuple[Path, str]]]:
    """RESULTS of the bundled sample less one photo in each class, and those photos."""
    return left_out_results(spark, SAMPLE, tmp_path_factory.mktemp("left_out"))


@pytest.fixture(scope="session")
def sample_engine(sample_left_out):
    """The query engine (model + PCA + index) on :func:`sample_left_out`."""
    from stages.search.query import QueryEngine

    return QueryEngine(str(sample_left_out[0]))


def copy_images(files, dest: Path) -> None:
    """Copy photos into ``dest/<their class folder>/`` (times kept: the incremental runs
    compare sizes and modification times)."""
    for f in files:
        (dest / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / f.parent.name / f.name)


@contextmanager
def killing_one_python_worker(roots: Callable[[], Iterable[int]]) -> Iterator[List[int]]:
    """While the block runs, SIGKILL the first PySpark Python worker found below the
    processes ``roots()`` names (this process in local mode, the worker daemons of a
    standalone cluster); yields the list its pid is appended to."""
    import psutil

    killed: List[int] = []
    stop = threading.Event()

    def is_worker(proc) -> bool:
        # A worker is a fork of pyspark.daemon, whose own parent is a JVM.
        parent = proc.parent()
        return (
            "pyspark.daemon" in " ".join(proc.cmdline())
            and parent is not None
            and "pyspark.daemon" in " ".join(parent.cmdline())
        )

    def watch() -> None:
        while not stop.is_set() and not killed:
            for pid in roots():
                try:
                    children = psutil.Process(pid).children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    try:
                        if is_worker(child):
                            child.send_signal(signal.SIGKILL)
                            killed.append(child.pid)
                            return
                    except psutil.Error:  # gone meanwhile
                        continue
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join(5)


@contextmanager
def serving(app) -> Iterator[Tuple[str, int]]:
    """``app`` served by uvicorn on a free localhost port, in this process (a thread):
    yields ``(host, port)``; stopped, and its thread ended, on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        yield sock.getsockname()
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()
