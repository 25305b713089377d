"""``fruits-pipeline index | similar | serve``: the search index and the app on it."""

from __future__ import annotations

import argparse
import json
import os

from stages.base.errors import UsageError
from stages.base.params import TOP_MAX
from stages.storage.layout import PROJECTIONS


def _top(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= TOP_MAX:
        raise argparse.ArgumentTypeError(f"{value} must be between 1 and {TOP_MAX}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def register(sub, common: argparse.ArgumentParser) -> None:
    """Add the three subcommands to the ``fruits-pipeline`` parser."""
    p = sub.add_parser(
        "index", parents=[common], help="(re)build RESULTS/index: search index and thumbnails"
    )
    p.add_argument("results", metavar="RESULTS")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("similar", help="the images of RESULTS most similar to a photo")
    p.add_argument("photo", metavar="PHOTO", help="a local image file")
    p.add_argument("results", metavar="RESULTS", help="a local RESULTS folder with index/")
    p.add_argument("--top", type=_top, default=10, help="matches to return (default 10)")
    p.add_argument("--json", action="store_true", help="print the answer object as JSON")
    p.set_defaults(func=_cmd_similar)

    p = sub.add_parser("serve", help="the web app: upload or take a photo, see the matches")
    p.add_argument("results", metavar="RESULTS", help="a local RESULTS folder with index/")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.set_defaults(func=_cmd_serve)


def _cmd_index(args) -> int:
    from stages.base.session import cli_session
    from stages.reduce.index import build_index

    local = args.results[len("file:") :] if args.results.startswith("file:") else args.results
    if "://" not in local and not os.path.isdir(os.path.join(local, PROJECTIONS)):
        raise UsageError(f"{args.results} has no projections/: give a RESULTS folder of `reduce`")
    spark = cli_session(args, "fruits-pipeline index")
    meta = build_index(spark, args.results)
    if not args.quiet:
        from stages.search.query import open_set_info

        keys = ("rows", "dims", "kind", "recall_at_10")
        out = {k: meta[k] for k in keys}
        out["open_set"] = open_set_info(meta["open_set"])
        print(json.dumps(out))
    return 0


def _cmd_similar(args) -> int:
    from stages.search.query import QueryEngine
    from stages.search.upload import BadImage

    try:
        with open(args.photo, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UsageError(f"cannot read {args.photo}: {exc.strerror}") from None
    engine = QueryEngine(args.results)
    try:
        answer = engine.similar_bytes(data, args.top)
    except BadImage as exc:
        raise UsageError(f"{args.photo}: {exc}") from None
    if args.json:
        print(json.dumps(answer, ensure_ascii=False))
        return 0
    print(answer["verdict"])
    print(_open_set_line(answer))
    for rank, m in enumerate(answer["matches"], 1):
        mark = "" if answer["close_match"] else "  (not a match)"
        print(f"{rank:3d}  {m['distance']:9.3f}  {m['label']:<24}  {m['path']}{mark}")
    return 0


def _open_set_line(answer) -> str:
    """How the answer was judged: the score against the threshold, and the rule's record."""
    got, rule = answer["open_set"], answer["model"]["open_set"]
    t = got["threshold"]
    head = f"open set: {got['rule']} score {got['score']:.3f}" + (
        f", threshold {t:.3f}" if t is not None else ", no threshold"
    )
    if not rule["calibrated"]:
        return f"{head} (not calibrated: {rule['reason']}; fallback: {rule['fallback']})"
    return (
        f"{head} (calibrated on the collection: {rule['known_accepted']:.0%} of held-out "
        f"photos of its fruits accepted, {rule['unknown_rejected']:.0%} of held-out fruits "
        f"refused, AUROC {rule['auroc']:.3f})"
    )


def _cmd_serve(args) -> int:
    from stages.search.serve import serve

    serve(args.results, host=args.host, port=args.port)
    return 0
