"""``fruits-pipeline``: the command line of both stages, the report and the EMR tools.

Every failure prints one line, ``fruits-pipeline: error: ...``, saying what is wrong
and how to fix it: exit code 2 for a bad argument or input, 1 for a run that failed.
The full trace (Python and Java) goes to a log file whose path that line gives, and
to the console only with ``--debug``.  Progress lines are ``logging`` records, set up
once here (:func:`stages.base.logs.configure_logging`): ``--quiet`` hides them, ``-v`` adds
the detail, and the log file gets them all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

from stages.base.errors import EXIT_USAGE, UsageError, explain
from stages.base.params import FeaturizeParams, ReduceParams, WatchParams
from stages.base.session import cli_session
from stages.storage.outputs import default_features_path

PROG = "fruits-pipeline"
logger = logging.getLogger("stages.cli")  # not __name__: `python -m stages.cli` runs it as __main__
# `run` is one featurize and one reduce: no growing-bucket options, one --overwrite.
RUN_EXCLUDES = {
    "featurize": ("incremental", "prune", "queue", "overwrite"),
    "reduce": ("update", "overwrite"),
}
_KEEP_LOGS = 50  # a folder of logs that grows without end would be the next bug report


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (not the usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def log_path() -> str:
    """A new log file for this run, under ``FRUITS_LOG_DIR`` (default
    ``~/.cache/fruits-pipeline/logs``)."""
    folder = os.environ.get("FRUITS_LOG_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fruits-pipeline", "logs"
    )
    os.makedirs(folder, exist_ok=True)
    old = sorted(f for f in os.listdir(folder) if f.startswith(f"{PROG}-") and f.endswith(".log"))
    for name in old[: max(0, len(old) - _KEEP_LOGS)]:
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return os.path.join(folder, f"{PROG}-{stamp}-{os.getpid()}.log")


def _conf_pair(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("spark."):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with a spark.* key")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs and tests)."""
    parser = OneLineParser(
        prog=PROG,
        description="Fruit photos to MobileNetV2 features to a PCA, on Spark (local or AWS EMR).",
    )
    parser.add_argument("--debug", action="store_true", help="print full traces and Spark's log")
    common = OneLineParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress lines")
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="also detail lines (-vv: and other libraries' debug log)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print full traces and Spark's log on the console",
    )
    common.add_argument(
        "--master", default=None, help="Spark master (default local[*]; spark-submit's wins)"
    )
    common.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_conf_pair,
        help="extra Spark setting (repeatable), e.g. --conf spark.executor.memory=4g",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "featurize", parents=[common], help="images (folder or s3://) -> features Parquet"
    )
    p.add_argument("input", metavar="INPUT", help="folder or URI of <Class>/<image>.jpg")
    p.add_argument("output", metavar="OUTPUT", help="features Parquet folder or URI")
    FeaturizeParams.add_arguments(p)
    p.set_defaults(func=_cmd_featurize)

    p = sub.add_parser(
        "reduce", parents=[common], help="features Parquet -> PCA results (Results/)"
    )
    p.add_argument("features", metavar="FEATURES")
    p.add_argument("results", metavar="RESULTS")
    ReduceParams.add_arguments(p)
    p.set_defaults(func=_cmd_reduce)

    p = sub.add_parser(
        "watch",
        parents=[common],
        help="Structured Streaming: featurize images as they land (checkpointed, exactly once)",
    )
    p.add_argument("input", metavar="INPUT", help="folder or URI of <Class>/<image>.jpg")
    p.add_argument("output", metavar="FEATURES", help="features folder (one run per micro-batch)")
    WatchParams.add_arguments(p)
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("run", parents=[common], help="featurize then reduce")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("results", metavar="RESULTS")
    p.add_argument(
        "--features", default=None, help="where the features go (default: Features/ beside RESULTS)"
    )
    FeaturizeParams.add_arguments(p, exclude=RUN_EXCLUDES["featurize"])
    ReduceParams.add_arguments(p, exclude=RUN_EXCLUDES["reduce"])
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", parents=[common], help="an HTML page of a RESULTS folder")
    p.add_argument("results", metavar="RESULTS")
    p.add_argument("--out", default=None, help="HTML file (default RESULTS/report.html)")
    p.set_defaults(func=_cmd_report)

    from cluster.cli import register

    register(sub)
    from stages.search.cli import register as register_search

    register_search(sub, common)
    return parser


def _cmd_featurize(args) -> int:
    from stages.featurize import featurize
    from stages.featurize.engine import check_engine
    from stages.featurize.queue import check_queue_input
    from stages.storage.outputs import check_disjoint

    params = FeaturizeParams.from_args(args)  # every check before the JVM starts
    check_disjoint([("OUTPUT", args.output, "INPUT", args.input)])
    if params.queue:
        check_queue_input(args.input)
    if params.engine:
        check_engine(params.engine)
    spark = cli_session(args, "fruits-pipeline featurize")
    report = featurize(spark, args.input, args.output, params)
    if not args.quiet:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "model"}))
    return 0


_SUMMARY_KEYS = ("rows", "error_rows", "k", "results")


def _cmd_reduce(args) -> int:
    from stages.reduce import reduce_features
    from stages.storage.outputs import check_disjoint

    params = ReduceParams.from_args(args)
    check_disjoint([("RESULTS", args.results, "FEATURES", args.features)])  # before the JVM
    spark = cli_session(args, "fruits-pipeline reduce")
    summary = reduce_features(spark, args.features, args.results, params)
    if not args.quiet:
        keys = _SUMMARY_KEYS + (("update",) if params.update else ())
        print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


def _cmd_run(args) -> int:
    from stages.featurize import featurize
    from stages.featurize.engine import check_engine
    from stages.reduce import reduce_features
    from stages.storage.outputs import check_disjoint, check_output

    featurize_params = FeaturizeParams.from_args(args)
    reduce_params = ReduceParams.from_args(args)
    features = args.features or default_features_path(args.results)
    check_disjoint(
        [
            ("FEATURES", features, "INPUT", args.input),
            ("RESULTS", args.results, "INPUT", args.input),
            ("RESULTS", args.results, "FEATURES", features),
        ]
    )
    if featurize_params.engine:
        check_engine(featurize_params.engine)  # before the JVM starts
    spark = cli_session(args, "fruits-pipeline run")
    check_output(spark, args.results, args.overwrite)  # before an hour of featurizing
    report = featurize(spark, args.input, features, featurize_params)
    summary = reduce_features(
        spark, features, args.results, reduce_params, featurize_report=report.to_dict()
    )
    if not args.quiet:
        print(json.dumps({k: summary[k] for k in _SUMMARY_KEYS}))
    return 0


def _cmd_watch(args) -> int:
    from stages.featurize.engine import check_engine
    from stages.featurize.queue import check_queue_input
    from stages.watch import watch

    params = WatchParams.from_args(args)  # checked before the JVM starts
    if params.engine:
        check_engine(params.engine)
    if params.queue:
        check_queue_input(args.input)
    spark = cli_session(args, "fruits-pipeline watch")
    report = watch(spark, args.input, args.output, params)
    if report["stopped"]:  # SIGINT or SIGTERM: one line, and the shell's code for it
        print(f"{PROG}: stopped; {report['images']} photos featurized since start", file=sys.stderr)
        return 128 + int(report["stopped"])
    if not args.quiet:
        print(json.dumps(report))
    return 0


def _cmd_report(args) -> int:
    from stages.report import write_report

    out = write_report(args.results, args.out)
    logger.info(f"report: {out}")
    return 0


def _record_failure(args, exc: BaseException) -> Optional[str]:
    """Append the trace of ``exc`` to the run's log file; its path, or None."""
    import traceback

    path = getattr(args, "log_file", None)
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{PROG} {' '.join(redacted(getattr(args, 'argv', [])))}\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    except OSError:
        return None
    return path


def redacted(argv: List[str]) -> List[str]:
    """``argv`` with the values of ``--conf KEY=VALUE`` hidden (an S3 secret key may be
    one), for the log file and ``-v``."""
    out: List[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and "=" in arg:
            arg = arg.split("=", 1)[0] + "=***"
        elif arg.startswith("--conf=") and arg.count("=") >= 2:
            flag, key, _ = arg.split("=", 2)
            arg = f"{flag}={key}=***"
        hide_next = arg == "--conf"
        out.append(arg)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fruits-pipeline`` console script.

    Returns 0, ``EXIT_USAGE`` (2) for a bad argument or input, ``EXIT_FAILED`` (1)
    for a run that failed, 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    debug = bool(getattr(args, "debug", False))
    quiet, verbose = bool(getattr(args, "quiet", False)), int(getattr(args, "verbose", 0) or 0)
    if quiet and verbose:
        print(f"{PROG}: error: --quiet and -v contradict each other: give one", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args.log_file = log_path()
    except OSError:
        args.log_file = None  # an unwritable home must not stop the run
    from stages.base.logs import configure_logging

    configure_logging(-1 if quiet else verbose, args.log_file, debug)
    logger.debug("%s %s (log file %s)", PROG, " ".join(redacted(argv)), args.log_file)
    try:
        code = int(args.func(args) or 0)
        if code == 0:
            from stages.base.jvm_archive import finish_archive

            finish_archive()
        return code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure becomes one line
        code, message = explain(exc)
        where = _record_failure(args, exc)
        if debug:
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__)
        if where and not isinstance(exc, UsageError):
            message += f" (full log: {where})"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
