"""The command line: one line and exit code 2 for bad arguments, no stack trace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.cli import main
from stages.storage.outputs import default_features_path
from tests.conftest import ROOT, SAMPLE


def _one_line_error(capsys, argv, match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fruits-pipeline: error: ")
    assert match in err[0]
    return err[0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["featurize", "IN", "OUT", "--batch-size", "0"], "0 must be at least 1"),
        (["featurize", "IN", "OUT", "--alpha", "wide"], "'wide' is not a number"),
        (["featurize", "IN", "OUT", "--engine", "onnx"], "invalid choice: 'onnx'"),
        (["featurize", "IN", "OUT", "--jpeg-draft", "-1"], "-1 must be 0 or more"),
        (["reduce", "F", "R", "--k", "3", "--variance", "0.9"], "not allowed with argument"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["reduce", "F", "R", "--k", "abc"], "argument --k: 'abc' is not an integer"),
        (["reduce", "F", "R", "--k", "0"], "argument --k: 0 must be at least 1"),
        (["reduce", "F", "R", "--variance", "1.5"], "argument --variance: 1.5 must be in (0, 1]"),
        (["featurize", "IN"], "the following arguments are required: OUTPUT"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line: no usage block
    assert err.startswith("fruits-pipeline: error: ") and match in err
    assert "--help" in err  # where to read how to fix it


def test_featurize_input_errors(spark, capsys, tmp_path):
    _one_line_error(
        capsys, ["featurize", str(tmp_path / "missing"), str(tmp_path / "o")], "does not exist"
    )
    (tmp_path / "noimg" / "A").mkdir(parents=True)
    (tmp_path / "noimg" / "A" / "x.txt").write_text("x")
    _one_line_error(
        capsys, ["featurize", str(tmp_path / "noimg"), str(tmp_path / "o")], "no .jpg/.jpeg images"
    )
    _one_line_error(
        capsys,
        ["featurize", str(SAMPLE), str(tmp_path / "o"), "--weights", "resnet"],
        "unknown --weights 'resnet'",
    )
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"this is not HDF5")
    _one_line_error(
        capsys,
        ["featurize", str(SAMPLE), str(tmp_path / "o"), "--weights", str(bad)],
        "cannot load weights",
    )
    _one_line_error(
        capsys,
        ["featurize", str(SAMPLE), str(tmp_path / "o"), "--weights", str(tmp_path / "gone.h5")],
        "does not exist: give a readable Keras .h5 file",
    )
    _one_line_error(
        capsys,
        ["featurize", str(SAMPLE), str(tmp_path / "o"), "--weights", "bundled", "--alpha", "1.0"],
        "drop --alpha",
    )
    assert not (tmp_path / "o").exists()


def test_reduce_errors(spark, capsys, tmp_path):
    _one_line_error(
        capsys, ["reduce", str(tmp_path / "F"), str(tmp_path / "R"), "--k", "2"], "do not exist"
    )


@pytest.mark.slow
def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    # No Java or Python stack trace reaches the user.
    cli = [
        sys.executable,
        "-m",
        "stages.cli",
        "featurize",
        str(tmp_path / "none"),
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "at org.apache" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fruits-pipeline: error: input ")


@pytest.mark.slow
def test_spark_submit_runs_the_stage_script(tmp_path):
    # The way an EMR step runs it: spark-submit stages/steps/featurize.py INPUT OUTPUT ...
    from pyspark.find_spark_home import _find_spark_home

    submit = f"{_find_spark_home()}/bin/spark-submit"
    out = tmp_path / "F"
    env = {"PYSPARK_PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [
            submit,
            "--master",
            "local[2]",
            "--driver-memory",
            "2g",
            "stages/steps/featurize.py",
            str(SAMPLE / "Kiwi"),
            str(out),
            "--weights",
            "random:0",
            "--alpha",
            "0.35",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**env, "JAVA_HOME": _java_home()},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["images"] == 10 and report["errors"] == 0


def _java_home() -> str:
    import os

    return os.environ.get("JAVA_HOME") or os.path.dirname(
        os.path.dirname(os.path.realpath("/usr/bin/java"))
    )


@pytest.mark.parametrize(
    ("results", "features"),
    [
        ("s3://b/Results/", "s3://b/Features"),
        ("demo/Results", "demo/Features"),
        ("/x/R", "/x/Features"),
    ],
)
def test_default_features_path(results, features):
    assert default_features_path(results) == features


# ------------------------------------------------- every failure is one line


def _failure(capsys, argv, code: int, match: str) -> str:
    """Run the CLI; one line on stderr with ``match`` and a log that holds the trace."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("fruits-pipeline: error: ") and match in err, err
    assert "Traceback" not in err and "\tat " not in err
    return err


def _log_of(line: str) -> str:
    import re

    m = re.search(r"\(full log: (.+)\)$", line.strip())
    assert m, f"no log path in {line!r}"
    with open(m.group(1), encoding="utf-8") as f:
        return f.read()


def test_corrupt_parquet_is_one_line_exit_2_and_the_trace_is_logged(spark, capsys, tmp_path):
    bad = tmp_path / "F"
    bad.mkdir()
    (bad / "part-00000.snappy.parquet").write_bytes(b"PAR1 this is not parquet")
    (bad / "_SUCCESS").touch()
    line = _failure(
        capsys, ["reduce", str(bad), str(tmp_path / "R"), "--k", "2"], 2, "not a readable Parquet"
    )
    assert "Traceback" in _log_of(line)
    assert not (tmp_path / "R").exists()


def test_a_conf_value_never_reaches_the_log_or_the_console(spark, capsys, tmp_path):
    secret = "spark.hadoop.fs.s3a.secret.key=SUPERSECRET"
    bad = tmp_path / "F"
    bad.mkdir()
    (bad / "part-00000.snappy.parquet").write_bytes(b"PAR1 this is not parquet")
    (bad / "_SUCCESS").touch()
    argv = ["reduce", str(bad), str(tmp_path / "R"), "--k", "2", "-v", "--conf", secret]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    log = _log_of(line)
    assert "SUPERSECRET" not in err and "SUPERSECRET" not in log
    assert "--conf spark.hadoop.fs.s3a.secret.key=***" in log  # the key says what was set


def test_non_finite_features_are_one_line(spark, capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    feats = [[float(i), 1.0, float("nan") if i == 3 else 2.0 * i] for i in range(6)]
    table = pa.table(
        {
            "path": [f"file:/x/A/{i}.jpg" for i in range(6)],
            "label": ["A"] * 6,
            "features": pa.array(feats, pa.list_(pa.float32())),
            "error": pa.array([None] * 6, pa.string()),
        }
    )
    (tmp_path / "F").mkdir()
    pq.write_table(table, tmp_path / "F" / "part-0.parquet")
    (tmp_path / "F" / "_SUCCESS").touch()
    _failure(
        capsys, ["reduce", str(tmp_path / "F"), str(tmp_path / "R"), "--k", "2"], 2, "NaN or inf"
    )


def test_an_unexpected_failure_is_one_line_exit_1_and_debug_prints_the_trace(
    spark, capsys, tmp_path, monkeypatch
):
    import stages.report

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(stages.report, "write_report", boom)
    line = _failure(capsys, ["report", str(tmp_path)], 1, "the run failed: RuntimeError: disk")
    assert "second line" not in line
    assert "RuntimeError: disk on fire" in _log_of(line)
    assert main(["report", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("fruits-pipeline: error: the run failed")


@pytest.mark.parametrize(
    ("text", "code", "match"),
    [
        (
            "java.nio.file.AccessDeniedException: s3a://b/Test/A/x.jpg: getFileStatus on "
            "s3a://b/Test/A/x.jpg: com.amazonaws.services.s3.model.AmazonS3Exception: "
            "Forbidden (Service: Amazon S3; Status Code: 403; Error Code: 403 Forbidden)",
            2,
            "access denied by S3 on s3a://b/Test/A/x.jpg: check the credentials",
        ),
        (
            "java.lang.ClassNotFoundException: Class org.apache.hadoop.fs.s3a.S3AFileSystem "
            "not found",
            2,
            "pip install --no-deps sagemaker_pyspark==1.4.5",
        ),
        (
            "[UNABLE_TO_INFER_SCHEMA] Unable to infer schema for Parquet at "
            "file:/data/Features. It must be specified manually.",
            2,
            "file:/data/Features holds no readable Parquet data (a run that was killed",
        ),
        ("java.lang.OutOfMemoryError: Java heap space", 1, "raise FRUITS_DRIVER_MEMORY"),
        ("something nobody foresaw", 1, "the run failed: RuntimeError: something nobody"),
    ],
)
def test_explain_names_the_cause_and_the_fix(text, code, match):
    from stages.base.errors import explain

    got_code, message = explain(RuntimeError(text))
    assert got_code == code
    assert match in message and "\n" not in message
