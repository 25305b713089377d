"""Java failures a user meets (a full disk, a second writer, S3 throttling or refusing) are
one sentence each: real exceptions from the JVM (Hadoop's local filesystem on ``/dev/full``,
Hadoop's ``create`` without overwrite, S3A against a local server that answers every request
with the error S3 sends), never a Py4J trace."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading

import pytest

from stages.base.errors import EXIT_FAILED, EXIT_USAGE, explain
from tests import s3_fixtures
from tests.conftest import SAMPLE, copy_images


def _java_error(call):
    from py4j.protocol import Py4JJavaError

    with pytest.raises(Py4JJavaError) as info:
        call()
    return info.value


def _one_sentence(exc, code: int, *parts: str) -> str:
    got, message = explain(exc)
    assert got == code, message
    assert "\n" not in message and "Py4J" not in message and "o1" not in message, message
    for part in parts:
        assert part in message, message
    return message


def test_a_java_error_once_the_jvm_has_ended_is_one_sentence():
    # A SIGTERM to the whole process group ends the JVM under the run: Py4J's error then
    # asks a JVM that is gone for its message. Once, that raised out of the error report
    # and the CLI printed a 100-line trace.
    import socket

    from py4j.java_gateway import GatewayParameters, JavaGateway, JavaObject
    from py4j.protocol import Py4JJavaError

    with socket.socket() as s:  # a port nothing listens on: the JVM's, once it has ended
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = JavaGateway(gateway_parameters=GatewayParameters(address="127.0.0.1", port=port))
    gone = JavaObject("o2", gateway._gateway_client)  # connects only when asked something
    exc = Py4JJavaError("An error occurred while calling o1.rename.\n", gone)
    _one_sentence(exc, EXIT_FAILED, "Spark's JVM ended during the run", "run again")


def test_no_space_left_on_device_is_one_sentence(spark):
    jvm, conf = spark._jvm, spark._jsc.hadoopConfiguration()
    raw = jvm.org.apache.hadoop.fs.FileSystem.getLocal(conf).getRaw()

    def write():
        out = raw.create(jvm.org.apache.hadoop.fs.Path("file:/dev/full"), True)
        out.write(bytearray(64 * 1024))
        out.close()

    _one_sentence(_java_error(write), EXIT_FAILED, "no space left on the device")


def _tiny_disk(path) -> bool:
    """Mount a 64 kB tmpfs at ``path`` (root only): a real full disk for a real run."""
    if os.geteuid() != 0:
        return False
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)])
    return proc.returncode == 0


def test_featurize_onto_a_full_disk_names_the_output_and_the_free_space(spark, capsys, tmp_path):
    from stages.cli import main

    disk = tmp_path / "disk"
    if not _tiny_disk(disk):
        pytest.skip("needs root to mount a 64 kB tmpfs")
    try:
        photos = tmp_path / "in"
        copy_images(sorted(SAMPLE.glob("*/*.jpg"))[:40], photos)
        assert main(["featurize", str(photos), str(disk / "F")]) == EXIT_FAILED
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after the run's one-line plan
        assert f"no space left on the device holding {disk / 'F'} (0 bytes free of " in line, err
        assert "Py4J" not in err and "\tat " not in err, err
        assert not (disk / "F").exists()
    finally:
        # lazy: the JVM may still hold the failed part file open for a moment
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_file_that_already_exists_is_one_sentence(spark, tmp_path):
    jvm, conf = spark._jvm, spark._jsc.hadoopConfiguration()
    path = jvm.org.apache.hadoop.fs.Path((tmp_path / "part-0.parquet").as_uri())
    fs = path.getFileSystem(conf)
    fs.create(path, True).close()
    exc = _java_error(lambda: fs.create(path, False))
    _one_sentence(exc, EXIT_FAILED, f"{tmp_path / 'part-0.parquet'} already exists", "at once")


class _S3Error(http.server.BaseHTTPRequestHandler):
    """Answers every request as S3 does when it throttles or refuses."""

    status, code = 503, "SlowDown"

    def _answer(self) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>{self.code}</Message><RequestId>1</RequestId></Error>"
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def s3_error_server(spark):
    s3_fixtures.require_s3a_jars()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _S3Error)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    conf = spark._jsc.hadoopConfiguration()
    for bucket in ("throttled", "refused"):
        prefix = f"fs.s3a.bucket.{bucket}."
        for key, value in {
            "endpoint": f"http://127.0.0.1:{srv.server_address[1]}",
            "path.style.access": "true",
            "connection.ssl.enabled": "false",
            "access.key": "testing",
            "secret.key": "testing",
            "aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
            "attempts.maximum": "1",
            "retry.limit": "1",
            "retry.interval": "10ms",
            "retry.throttle.limit": "2",
            "retry.throttle.interval": "10ms",
        }.items():
            conf.set(prefix + key, value)
    yield srv
    srv.shutdown()
    thread.join(10)


@pytest.mark.parametrize(
    ("bucket", "status", "code", "exit_code", "parts"),
    [
        ("throttled", 503, "SlowDown", EXIT_FAILED, ("S3 throttled", "s3a://throttled/F")),
        ("refused", 403, "AccessDenied", EXIT_USAGE, ("access denied by S3 on s3a://refused/F",)),
    ],
)
def test_s3_throttling_and_refusal_are_one_sentence(
    spark, s3_error_server, bucket, status, code, exit_code, parts
):
    _S3Error.status, _S3Error.code = status, code
    exc = _java_error(lambda: spark.read.parquet(f"s3a://{bucket}/F").count())
    _one_sentence(exc, exit_code, *parts)
