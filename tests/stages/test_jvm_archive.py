"""The local JVM's class archive (AppCDS): dumped once by a command, mapped by the next,
never half-written, one dumper at a time, off on request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.base import jvm_archive
from stages.base.jvm_archive import (
    ArchiveDump,
    archive_key,
    archive_options,
    java_major,
    promote,
)
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


def test_a_part_still_being_written_for_a_live_waiter_is_left_alone(tmp_path, fresh):
    # Regression: the next command deleted the part and log of a dump whose command had
    # returned (its pid dead) while the JVM was still writing them for its waiter, and the
    # waiter then recorded the dump as failed.
    key = archive_key({}, "4g")
    folder = tmp_path / "jvm"
    folder.mkdir()
    dead = _dead_pid()
    (folder / f"spark-{key}.lock").write_text(str(os.getpid()))  # the waiter, alive
    part = folder / f"spark-{key}.jsa.part-{dead}"
    log = folder / f"spark-{key}.part-{dead}.log"
    part.write_bytes(b"being written")
    log.write_text("[info][cds,dynamic] Archiving ...\n")
    assert archive_options(tmp_path, {}, "4g") == []
    assert part.exists() and log.exists()


def test_an_archive_in_place_is_mapped_not_dumped(tmp_path, fresh):
    key = archive_key({}, "4g")
    final = tmp_path / "jvm" / f"spark-{key}.jsa"
    final.parent.mkdir()
    final.write_bytes(b"x")
    options = archive_options(tmp_path, {}, "4g")
    assert options[-1] == f'"-XX:SharedArchiveFile={final}"'
    assert jvm_archive.pending_dump() is None


def test_a_failed_dump_is_tried_again_after_a_day_only(tmp_path, fresh):
    key = archive_key({}, "4g")
    (tmp_path / "jvm").mkdir()
    failed = tmp_path / "jvm" / f"spark-{key}.failed"
    failed.touch()
    assert archive_options(tmp_path, {}, "4g") == []
    day_ago = time.time() - jvm_archive.FAILED_RETRY_S - 60
    os.utime(failed, (day_ago, day_ago))
    assert archive_options(tmp_path, {}, "4g") and jvm_archive.pending_dump() is not None


def _dump(tmp_path: Path, log: str) -> ArchiveDump:
    folder = tmp_path / "jvm"
    folder.mkdir(exist_ok=True)
    dump = ArchiveDump(
        folder / "spark-k.jsa.part-1", folder / "spark-k.part-1.log", folder / "spark-k.jsa",
        folder / "spark-k.failed", folder / "spark-k.lock",
    )  # fmt: skip
    dump.part.write_bytes(b"an archive")
    dump.log.write_text(log)
    dump.lock.write_text("1")
    return dump


def test_a_dump_is_moved_into_place_once_its_jvm_is_gone_and_its_log_says_written(tmp_path):
    dump = _dump(tmp_path, "[info][cds,dynamic] Written dynamic archive 0x8 - 0x9\n")
    assert promote(_dead_pid(), dump)
    assert dump.final.read_bytes() == b"an archive"
    assert not dump.part.exists() and not dump.lock.exists() and not dump.log.exists()


def test_a_dump_whose_log_does_not_say_written_is_a_failure_remembered(tmp_path):
    dump = _dump(tmp_path, "[warning][cds] Cannot dump shared archive\n")
    assert not promote(_dead_pid(), dump)
    assert not dump.final.exists() and dump.failed.exists() and not dump.part.exists()


def test_a_dump_with_no_part_written_is_not_a_failure(tmp_path):
    dump = _dump(tmp_path, "")
    dump.part.unlink()
    assert not promote(_dead_pid(), dump)
    assert not dump.failed.exists() and not dump.lock.exists()


def test_a_jvm_still_running_when_the_wait_ends_leaves_no_archive(tmp_path):
    dump = _dump(tmp_path, "")
    assert not promote(os.getpid(), dump, wait_s=0.3)
    assert not dump.final.exists() and not dump.failed.exists() and not dump.lock.exists()


def test_the_key_follows_the_heap_and_the_class_path(fresh):
    base = archive_key({}, "4g")
    assert base is not None and base == archive_key({}, "4g")
    assert archive_key({}, "40g") != base  # no compressed oops above 32g
    assert archive_key({"spark.driver.extraClassPath": "/x.jar"}, "4g") != base


@pytest.mark.parametrize(
    "release, major",
    [('JAVA_VERSION="17.0.15"', 17), ('JAVA_VERSION="1.8.0_392"', 8), ('JAVA_VERSION="21"', 21),
     ('JAVA_VERSION="11.0.2"', 11), ("IMPLEMENTOR=x", 0)],
)  # fmt: skip
def test_the_jdk_major_version_from_its_release_file(tmp_path, release, major):
    (tmp_path / "release").write_text(f'IMPLEMENTOR="x"\n{release}\n')
    assert java_major(tmp_path) == major


def test_a_jdk_before_17_gets_no_option_it_would_not_start_with(tmp_path, fresh, monkeypatch):
    jdk = tmp_path / "jdk11"
    (jdk / "bin").mkdir(parents=True)
    (jdk / "bin" / "java").write_text("")
    (jdk / "release").write_text('JAVA_VERSION="11.0.2"\n')
    monkeypatch.setenv("JAVA_HOME", str(jdk))
    assert archive_options(tmp_path / "cache", {}, "4g") == []


def test_a_cache_path_jvm_options_cannot_carry_gets_no_archive(tmp_path, fresh):
    assert archive_options(tmp_path / "a b:c", {}, "4g") == []
    assert jvm_archive.pending_dump() is None


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
    # The command did not wait for the dump: its waiter moves the archive into place once
    # the JVM is gone, and then removes its lock.
    deadline = time.monotonic() + 300
    while list(folder.glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.5)
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
