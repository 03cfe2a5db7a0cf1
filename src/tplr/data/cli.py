"""``tplr shards ...``: prepare, convert, inspect, upload."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("shards", help="prepare, convert, inspect and upload token shards")
    p.add_subparsers(dest="shards_command", metavar="SHARDS_COMMAND", required=True)
