"""Disk-space preflight for downloads: fail before writing a byte, naming the numbers."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tplr.comms.errors import InsufficientSpace

FreeSpaceProbe = Callable[[Path], int]
"""Returns the bytes an unprivileged writer may still use on ``path``'s filesystem."""


def free_bytes(path: Path) -> int:
    """The default probe: ``statvfs`` free blocks available to unprivileged users."""
    return shutil.disk_usage(path).free


def allocated_bytes(path: Path) -> int:
    """Bytes already allocated on disk to ``path`` (0 if absent): a resumed sidecar file
    that was preallocated needs no new space."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def check_free_space(
    directory: Path, needed_bytes: int, probe: FreeSpaceProbe | None = None
) -> None:
    """Raise :class:`InsufficientSpace` if ``directory``'s filesystem lacks ``needed_bytes``."""
    if needed_bytes <= 0:
        return
    free = (probe or free_bytes)(directory)
    if free < needed_bytes:
        raise InsufficientSpace(
            str(directory),
            needed_bytes,
            free,
            hint=f"free at least {needed_bytes - free} bytes there, or download to another disk",
        )
