"""``fruits-pipeline``: the command line of both stages, the report and the EMR tools.

A bad argument or input prints one line, ``fruits-pipeline: error: ...``, saying
what is wrong and how to fix it, and exits with code 2; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from typing import Callable, List, Optional

from stages.errors import EXIT_USAGE, UsageError

PROG = "fruits-pipeline"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _conf_pair(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("spark."):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with a spark.* key")
    return key, value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _add_featurize_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("featurize options")
    g.add_argument(
        "--weights",
        default="bundled",
        help="imagenet (Keras download on the driver, alpha 1.0), bundled (offline alpha-0.35 "
        "ImageNet weights, the default), random:SEED, or a path to a Keras .h5 file",
    )
    g.add_argument("--alpha", type=_float, default=None, help="MobileNetV2 width multiplier")
    g.add_argument(
        "--engine",
        choices=["litert", "keras"],
        default=None,
        help="litert (TFLite flatbuffer on XNNPACK, no TensorFlow on the workers; the default "
        "where ai-edge-litert is installed) or keras (the reference)",
    )
    g.add_argument(
        "--jpeg-draft",
        type=_non_negative_int,
        default=None,
        metavar="K",
        help="decode large JPEGs at reduced scale, keeping >= K x 224 px (~3x faster on 12 MP "
        "photos, features within cosine 0.9996 at K=2); default off, full decode",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per model call (default 8 with litert, 64 with keras)",
    )
    g.add_argument(
        "--partitions",
        type=_positive_int,
        default=None,
        help="tasks (default: from the image count)",
    )


def _add_reduce_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reduce options")
    k = g.add_mutually_exclusive_group()
    k.add_argument("--k", type=int, default=None, help="number of principal components")
    k.add_argument(
        "--variance",
        type=_float,
        default=None,
        help="keep the fewest components reaching this share of variance (default 0.95)",
    )
    g.add_argument(
        "--check",
        choices=["spark-ml"],
        default=None,
        help="also fit Spark ML StandardScaler+PCA and record the agreement in summary.json",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fruit photos to MobileNetV2 features to a PCA, on Spark (local or AWS EMR).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress lines")
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
    _add_featurize_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(func=_cmd_featurize)

    p = sub.add_parser(
        "reduce", parents=[common], help="features Parquet -> PCA results (Results/)"
    )
    p.add_argument("features", metavar="FEATURES")
    p.add_argument("results", metavar="RESULTS")
    _add_reduce_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing RESULTS")
    p.set_defaults(func=_cmd_reduce)

    p = sub.add_parser("run", parents=[common], help="featurize then reduce")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("results", metavar="RESULTS")
    p.add_argument(
        "--features", default=None, help="where the features go (default: Features/ beside RESULTS)"
    )
    _add_featurize_options(p)
    _add_reduce_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", parents=[common], help="an HTML page of a RESULTS folder")
    p.add_argument("results", metavar="RESULTS")
    p.add_argument("--out", default=None, help="HTML file (default RESULTS/report.html)")
    p.set_defaults(func=_cmd_report)

    try:
        from cluster.cli import register
    except ImportError:  # pragma: no cover - cluster/ is part of the package
        register = None
    if register is not None:
        register(sub)
    return parser


def _logger(args) -> Callable[[str], None]:
    if args.quiet:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _session(args, app: str):
    from stages.session import spark_session

    conf = {"spark.ui.showConsoleProgress": "false" if args.quiet else "true"}
    conf.update(dict(getattr(args, "conf", None) or []))
    return spark_session(app, master=args.master, conf=conf)


def _cmd_featurize(args) -> int:
    from stages.engine import check_engine
    from stages.featurize import featurize

    if args.engine:
        check_engine(args.engine)  # before the JVM starts
    spark = _session(args, "fruits-pipeline featurize")
    report = featurize(
        spark,
        args.input,
        args.output,
        weights=args.weights,
        alpha=args.alpha,
        batch_size=args.batch_size,
        partitions=args.partitions,
        overwrite=args.overwrite,
        log=_logger(args),
        engine=args.engine,
        jpeg_draft=args.jpeg_draft or 0,
    )
    if not args.quiet:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "model"}))
    return 0


def _reduce_kwargs(args) -> dict:
    variance = args.variance
    if args.k is None and variance is None:
        variance = 0.95
    return {"k": args.k, "variance": variance, "check": args.check}


def _cmd_reduce(args) -> int:
    from stages.reduce import reduce_features

    spark = _session(args, "fruits-pipeline reduce")
    summary = reduce_features(
        spark,
        args.features,
        args.results,
        overwrite=args.overwrite,
        log=_logger(args),
        **_reduce_kwargs(args),
    )
    if not args.quiet:
        print(json.dumps({k: summary[k] for k in ("rows", "error_rows", "k", "results")}))
    return 0


def default_features_path(results: str) -> str:
    """``Features`` beside ``results`` (``s3://b/Results/`` -> ``s3://b/Features``)."""
    parent = posixpath.dirname(results.rstrip("/"))
    if not parent or parent.endswith(":") or parent.endswith(":/"):
        raise UsageError(f"cannot put Features beside {results}: pass --features PATH")
    return posixpath.join(parent, "Features")


def _cmd_run(args) -> int:
    from stages.engine import check_engine
    from stages.featurize import check_output, featurize
    from stages.reduce import reduce_features

    features = args.features or default_features_path(args.results)
    if args.engine:
        check_engine(args.engine)  # before the JVM starts
    spark = _session(args, "fruits-pipeline run")
    log = _logger(args)
    check_output(spark, args.results, args.overwrite)  # before an hour of featurizing
    report = featurize(
        spark,
        args.input,
        features,
        weights=args.weights,
        alpha=args.alpha,
        batch_size=args.batch_size,
        partitions=args.partitions,
        overwrite=args.overwrite,
        log=log,
        engine=args.engine,
        jpeg_draft=args.jpeg_draft or 0,
    )
    summary = reduce_features(
        spark,
        features,
        args.results,
        overwrite=args.overwrite,
        log=log,
        featurize_report=report.to_dict(),
        **_reduce_kwargs(args),
    )
    if not args.quiet:
        print(json.dumps({k: summary[k] for k in ("rows", "error_rows", "k", "results")}))
    return 0


def _cmd_report(args) -> int:
    from stages.report import write_report

    out = write_report(args.results, args.out)
    if not args.quiet:
        print(f"report: {out}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fruits-pipeline`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
