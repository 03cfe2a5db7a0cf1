"""``tplr put``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Placeholder until the put command lands."""
