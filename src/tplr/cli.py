"""``tplr`` command line: one parser, subcommands contributed by each layer.

Each layer's ``cli`` module exposes ``register(subparsers)``; a subcommand sets
``func`` (returns an exit code). A :class:`~tplr.errors.TplrError` ends the command
with one clear line and a hint, without a traceback (``--debug`` shows it).

Exit codes: 0 success; 2 a usage or configuration error (bad flags, a
:class:`~tplr.errors.ConfigError`); 1 a failure at run time (storage, network, data);
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tplr import __version__
from tplr.errors import ConfigError, TplrError
from tplr.node.process.log_setup import configure_logging, parse_level

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _log_level(text: str) -> str:
    try:
        return parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from tplr.comms import cli as comms_cli
    from tplr.data.tools import cli as data_cli
    from tplr.doctor import cli as doctor_cli

    parser = argparse.ArgumentParser(
        prog="tplr",
        description="tplr: incentivised, internet-wide LLM pretraining over S3-compatible storage.",
    )
    parser.add_argument("--version", action="version", version=f"tplr {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs on errors"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=_log_level,
        help="logging level (DEBUG, INFO, WARNING, ERROR; default INFO)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON"
    )
    parser.add_argument(
        "--debug-wire",
        action="store_true",
        default=None,
        help="also log HTTP/S3 request dumps: they contain access key ids and request "
        "signatures (env TPLR_DEBUG_WIRE)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    comms_cli.register(subparsers)
    data_cli.register(subparsers)
    doctor_cli.register(subparsers)
    return parser


def _debug_wire(args: argparse.Namespace) -> bool:
    if args.debug_wire is not None:
        return True
    return os.environ.get("TPLR_DEBUG_WIRE", "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(
        "DEBUG" if args.debug else args.log_level,
        log_format=args.log_format,
        debug_wire=_debug_wire(args),
    )
    try:
        return int(args.func(args) or 0)
    except TplrError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
