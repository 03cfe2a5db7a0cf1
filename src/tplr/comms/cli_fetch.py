"""``tplr fetch``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Placeholder until the fetch command lands."""
