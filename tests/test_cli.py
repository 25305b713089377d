"""The command line: one line and exit code 2 for bad arguments, no stack trace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.cli import default_features_path, main
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
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


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
        capsys,
        ["reduce", str(tmp_path / "F"), str(tmp_path / "R"), "--k", "0"],
        "--k 0 must be at least 1",
    )
    _one_line_error(
        capsys, ["reduce", str(tmp_path / "F"), str(tmp_path / "R"), "--k", "2"], "do not exist"
    )


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
    # The way an EMR step runs it: spark-submit stages/featurize.py INPUT OUTPUT ...
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
            "stages/featurize.py",
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
