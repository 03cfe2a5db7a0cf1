"""``tplr`` command line: one parser, subcommands contributed by each layer.

Each layer's ``cli`` module exposes ``register(subparsers)``; a subcommand sets
``func`` (returns an exit code). A :class:`~tplr.errors.TplrError` ends the command
with one clear line and a hint, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tplr import __version__
from tplr.errors import TplrError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from tplr.comms import cli as comms_cli
    from tplr.data import cli as data_cli

    parser = argparse.ArgumentParser(
        prog="tplr",
        description="tplr: incentivised, internet-wide LLM pretraining over S3-compatible storage.",
    )
    parser.add_argument("--version", action="version", version=f"tplr {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs on errors"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING; default INFO)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    comms_cli.register(subparsers)
    data_cli.register(subparsers)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("DEBUG" if args.debug else args.log_level)
    try:
        return int(args.func(args) or 0)
    except TplrError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
