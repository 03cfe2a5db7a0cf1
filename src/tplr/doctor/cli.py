"""``tplr doctor`` (placeholder until the checks land)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("doctor", help="check this host, its settings, buckets and run")
