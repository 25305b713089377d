"""stages.base.logs.configure_logging: the one logging configuration of the CLI (no JVM)."""

from __future__ import annotations

import logging
import re

import pytest

from stages.base import logs
from stages.base.logs import configure_logging

STAGE = logging.getLogger("stages.featurize.frame")
OTHER = logging.getLogger("botocore.credentials")
FILE_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: .+$"
)


@pytest.fixture(autouse=True)
def restore_logging():
    """Each test starts unconfigured and leaves logging as it found it."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), OTHER.level)
    saved_ours = {n: logging.getLogger(n).level for n in logs.PROJECT_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in saved[1]:
            root.removeHandler(handler)
            handler.close()
    logs._installed.clear()
    root.setLevel(saved[0])
    OTHER.setLevel(saved[2])
    for name, level in saved_ours.items():
        logging.getLogger(name).setLevel(level)


def _emit_all() -> None:
    STAGE.debug("featurize: detail")
    STAGE.info("featurize: wrote 3 rows")
    STAGE.warning("index: 1 image folder(s) gone: no thumbnails there")
    OTHER.debug("botocore: debug chatter")
    OTHER.info("botocore: info chatter")
    OTHER.warning("botocore: a warning")


def _err_lines(capsys) -> list:
    return capsys.readouterr().err.splitlines()


def test_default_prints_progress_lines_as_they_always_looked(capsys):
    configure_logging(0)
    _emit_all()
    assert _err_lines(capsys) == [
        "featurize: wrote 3 rows",
        "index: 1 image folder(s) gone: no thumbnails there",
        "botocore: a warning",
    ]


def test_quiet_hides_progress_but_not_warnings(capsys):
    configure_logging(-1)
    _emit_all()
    assert _err_lines(capsys) == [
        "index: 1 image folder(s) gone: no thumbnails there",
        "botocore: a warning",
    ]


def test_verbose_shows_our_debug_but_not_other_libraries_chatter(capsys):
    OTHER.setLevel(logging.DEBUG)  # even a library that turns its own logger up
    configure_logging(1)
    _emit_all()
    assert _err_lines(capsys) == [
        "featurize: detail",
        "featurize: wrote 3 rows",
        "index: 1 image folder(s) gone: no thumbnails there",
        "botocore: a warning",
    ]


def test_very_verbose_also_shows_other_libraries_debug(capsys):
    configure_logging(2)
    _emit_all()
    lines = _err_lines(capsys)
    assert "botocore: debug chatter" in lines and "featurize: detail" in lines
    assert len(lines) == 6


def test_debug_flag_shows_detail_unless_quiet(capsys):
    configure_logging(0, debug=True)
    STAGE.debug("featurize: detail")
    assert _err_lines(capsys) == ["featurize: detail"]
    configure_logging(-1, debug=True)
    STAGE.debug("featurize: detail")
    STAGE.info("featurize: wrote 3 rows")
    assert _err_lines(capsys) == []


def test_the_log_file_gets_every_record_at_debug_with_time_and_logger(tmp_path, capsys):
    log_file = tmp_path / "run.log"
    log_file.write_text("an earlier line (Spark's log shares the file)\n")
    configure_logging(-1, str(log_file))
    _emit_all()
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "an earlier line (Spark's log shares the file)"  # appended, not replaced
    assert all(FILE_LINE.match(line) for line in lines[1:]), lines
    assert [line.split(" ", 1)[1] for line in lines[1:]] == [
        "DEBUG stages.featurize.frame: featurize: detail",
        "INFO stages.featurize.frame: featurize: wrote 3 rows",
        "WARNING stages.featurize.frame: index: 1 image folder(s) gone: no thumbnails there",
        "WARNING botocore.credentials: botocore: a warning",
    ]
    assert len(_err_lines(capsys)) == 2  # the console stayed quiet


def test_configuring_twice_replaces_the_handlers(tmp_path, capsys):
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    configure_logging(0, str(first))
    configure_logging(0, str(second))
    configure_logging(0, str(second))
    assert len(root.handlers) == before + 2  # one console, one file
    STAGE.info("featurize: wrote 3 rows")
    assert _err_lines(capsys) == ["featurize: wrote 3 rows"]  # printed once
    assert first.read_text() == ""  # the first call's file no longer receives records
    assert second.read_text().count("featurize: wrote 3 rows") == 1


def test_console_follows_the_current_stderr(capsys, monkeypatch):
    import io

    configure_logging(0)
    swapped = io.StringIO()
    monkeypatch.setattr("sys.stderr", swapped)  # as a notebook kernel or Livy does
    STAGE.info("featurize: wrote 3 rows")
    assert swapped.getvalue() == "featurize: wrote 3 rows\n"


def test_stdout_stream_for_notebooks(capsys):
    configure_logging(0, stream="stdout")
    STAGE.info("featurize: wrote 3 rows")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("featurize: wrote 3 rows\n", "")


def test_an_unwritable_log_file_does_not_stop_the_run(tmp_path, capsys):
    configure_logging(0, str(tmp_path))  # a folder: cannot be opened as a file
    STAGE.info("featurize: wrote 3 rows")
    assert capsys.readouterr().err == "featurize: wrote 3 rows\n"


def test_python_dash_m_stages_cli_logs_under_the_same_names(tmp_path):
    # Run as __main__, the CLI module must still log as stages.cli (else -v shows nothing).
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), FRUITS_LOG_DIR=str(tmp_path))
    argv = [sys.executable, "-m", "stages.cli", "emr", "policy", "--bucket", "fruits-eu", "-v"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["Version"] == "2012-10-17"  # the output, on stdout
    assert proc.stderr.startswith("fruits-pipeline emr policy --bucket fruits-eu -v (log file ")
    (log,) = tmp_path.glob("fruits-pipeline-*.log")
    assert " DEBUG stages.cli: fruits-pipeline emr policy " in log.read_text(encoding="utf-8")


def _failing_call(logger: logging.Logger, message: str) -> None:
    try:
        raise ValueError("boom in a foreachBatch call")
    except ValueError:
        logger.exception(message)


@pytest.mark.parametrize("verbosity", [-1, 0, 1])
def test_no_trace_reaches_the_console_without_debug(tmp_path, capsys, verbosity):
    log_file = tmp_path / "run.log"
    configure_logging(verbosity, str(log_file))
    # py4j logs a failed Python callback (a watch micro-batch) with its trace; the
    # failure reaches the CLI as an exception too, which prints it as one line.
    _failing_call(logging.getLogger("py4j.clientserver"), "An error occurred in the callback")
    _failing_call(STAGE, "featurize: a step failed")
    assert _err_lines(capsys) == ["featurize: a step failed"]
    text = log_file.read_text(encoding="utf-8")
    assert text.count("Traceback (most recent call last)") == 2  # both, whole, in the file
    assert "ValueError: boom in a foreachBatch call" in text


def test_debug_shows_the_traces_and_vv_shows_py4j(capsys):
    configure_logging(0, debug=True)
    _failing_call(STAGE, "featurize: a step failed")
    err = capsys.readouterr().err
    assert err.startswith("featurize: a step failed\nTraceback") and "ValueError: boom" in err
    configure_logging(2)
    _failing_call(logging.getLogger("py4j.clientserver"), "An error occurred in the callback")
    assert "An error occurred in the callback" in capsys.readouterr().err


def test_console_shows_follows_the_console_not_the_project_loggers(tmp_path):
    # A log file puts the project's loggers at DEBUG: what --quiet hides is the console's.
    assert logs.console_shows(logging.INFO)  # nothing installed: a library use
    configure_logging(-1, str(tmp_path / "run.log"))
    assert logging.getLogger("stages").getEffectiveLevel() <= logging.INFO
    assert not logs.console_shows(logging.INFO) and logs.console_shows(logging.WARNING)
    configure_logging(0, str(tmp_path / "run.log"))
    assert logs.console_shows(logging.INFO)
