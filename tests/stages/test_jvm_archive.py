"""The local JVM's class archive (AppCDS): dumped once by a command, mapped by the next,
never half-written, one dumper at a time, off on request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.base import jvm_archive
from stages.base.jvm_archive import archive_key, archive_options
from tests.conftest import ROOT


@pytest.fixture()
def fresh(monkeypatch):
    """No dump pending from an earlier test of this process."""
    monkeypatch.setattr(jvm_archive, "_PENDING", None)
    monkeypatch.delenv("FRUITS_JVM_CDS", raising=False)
    yield
    jvm_archive._PENDING = None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_no_archive_yet_means_this_run_dumps_it_and_holds_the_lock(tmp_path, fresh):
    options = archive_options(tmp_path, {}, "4g")
    dump = jvm_archive.pending_dump()
    assert dump is not None
    assert any(o.startswith('"-XX:ArchiveClassesAtExit=') for o in options)
    assert str(dump.part) in " ".join(options) and not dump.final.exists()
    assert dump.lock.read_text() == str(os.getpid())
    # The JVM's CDS lines stay off the console; the dump's own log goes to a file.
    assert "-Xlog:cds=off" in options and f'"-Xlog:cds+dynamic=info:file={dump.log}"' in options


def test_a_second_command_while_one_dumps_neither_dumps_nor_waits(tmp_path, fresh):
    archive_options(tmp_path, {}, "4g")
    jvm_archive._PENDING = None  # another process, as far as the lock is concerned
    assert archive_options(tmp_path, {}, "4g") == []
    assert jvm_archive.pending_dump() is None


def test_a_lock_left_by_a_dead_command_is_taken_over_and_its_part_removed(tmp_path, fresh):
    key = archive_key({}, "4g")
    folder = tmp_path / "jvm"
    folder.mkdir()
    dead = _dead_pid()
    (folder / f"spark-{key}.lock").write_text(str(dead))
    stale = folder / f"spark-{key}.jsa.part-{dead}"
    stale.write_bytes(b"half an archive")
    options = archive_options(tmp_path, {}, "4g")
    assert jvm_archive.pending_dump() is not None and options
    assert not stale.exists()


def test_an_archive_in_place_is_mapped_not_dumped(tmp_path, fresh):
    key = archive_key({}, "4g")
    final = tmp_path / "jvm" / f"spark-{key}.jsa"
    final.parent.mkdir()
    final.write_bytes(b"x")
    options = archive_options(tmp_path, {}, "4g")
    assert options[-1] == f'"-XX:SharedArchiveFile={final}"'
    assert jvm_archive.pending_dump() is None


def test_a_failed_dump_is_not_tried_again(tmp_path, fresh):
    key = archive_key({}, "4g")
    (tmp_path / "jvm").mkdir()
    (tmp_path / "jvm" / f"spark-{key}.failed").touch()
    assert archive_options(tmp_path, {}, "4g") == []


def test_the_key_follows_the_heap_and_the_class_path(fresh):
    base = archive_key({}, "4g")
    assert base is not None and base == archive_key({}, "4g")
    assert archive_key({}, "40g") != base  # no compressed oops above 32g
    assert archive_key({"spark.driver.extraClassPath": "/x.jar"}, "4g") != base


def test_off_by_environment(tmp_path, fresh, monkeypatch):
    monkeypatch.setenv("FRUITS_JVM_CDS", "0")
    assert archive_options(tmp_path, {}, "4g") == []


_PROBE = """
import json, sys
from stages.base.session import spark_session
from stages.base.jvm_archive import finish_archive
s = spark_session("probe", conf={"spark.ui.enabled": "false"}, class_archive=True)
jvm = s.sparkContext._jvm
args = list(jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
print("PROBE " + json.dumps({"cp": jvm.System.getProperty("java.class.path"), "args": args}))
sys.stdout.flush()
finish_archive()
"""


def _probe(cache: Path) -> dict:
    env = {**os.environ, "FRUITS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("FRUITS_JVM_CDS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    # Nothing of the JVM's CDS log on the console, in either run.
    assert "cds" not in proc.stdout.replace(line, "") and "[cds" not in proc.stderr
    return json.loads(line[len("PROBE ") :])


@pytest.mark.slow
def test_the_first_run_writes_an_archive_the_next_jvm_maps(tmp_path):
    first = _probe(tmp_path)
    assert any(a.startswith("-XX:ArchiveClassesAtExit=") for a in first["args"])
    folder = tmp_path / "jvm"
    archives = list(folder.glob("spark-*.jsa"))
    assert len(archives) == 1 and archives[0].stat().st_size > 10_000_000
    # Moved into place after the JVM's exit: no part, log or lock is left.
    assert sorted(p.name for p in folder.iterdir()) == [archives[0].name]

    second = _probe(tmp_path)
    assert f"-XX:SharedArchiveFile={archives[0]}" in second["args"]
    # The archive is whole and fits the JVM's class path: with -Xshare:on a JVM that
    # cannot map it fails instead of running without it.
    java = shutil.which("java", path=os.path.join(os.environ.get("JAVA_HOME", ""), "bin"))
    java = java or shutil.which("java")
    check = subprocess.run(
        [java, "-Xshare:on", f"-XX:SharedArchiveFile={archives[0]}", "-cp", second["cp"]]
        + ["-version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr[-2000:]
