"""Checkpoint files: atomic write (tmp + fsync + rename), safe read (``weights_only=True``).

A checkpoint is a dict of tensors and plain values only (RNG states stored as tensors and
lists), so ``torch.load(weights_only=True)`` reads it and nothing is ever unpickled::

    {"format": "tplr-train-checkpoint", "version": 1, "step": int,
     "model_config": {...}, "train_config": {...}, "world_size": int,
     "model": state_dict, "optimizers": {"adamw": state_dict, "muon": state_dict},
     "scheduler": {...}, "rng": {"torch": ByteTensor, "cuda": ByteTensor | None,
     "python": [version, [ints], gauss | None], "numpy": {...}}}
"""

from __future__ import annotations

import errno
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tplr.comms.diskspace import FreeSpaceProbe, free_bytes
from tplr.comms.errors import InsufficientSpace
from tplr.train.errors import CheckpointError

CHECKPOINT_FORMAT = "tplr-train-checkpoint"
CHECKPOINT_VERSION = 1


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": [version, list(mt_state), gauss],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    )


_SPACE_MARGIN_BYTES = 64 << 10  # zip records, pickled structure, alignment


def estimated_bytes(state: Any) -> int:
    """Bytes ``torch.save(state)`` will need: every tensor's data plus a margin."""
    total = 0
    pending = [state]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return total + total // 100 + _SPACE_MARGIN_BYTES


def _space_error(folder: Path, needed: int, free: int) -> InsufficientSpace:
    return InsufficientSpace(
        str(folder),
        needed,
        free,
        hint=f"free at least {max(needed - free, 1)} bytes there, or save to a larger disk",
    )


def _disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised while handling) is a full disk or quota.

    torch's zip writer reports a failed write as ``RuntimeError: ... unexpected pos``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, RuntimeError) and "unexpected pos" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def write_checkpoint_atomic(
    state: dict[str, Any], path: Path, *, free_space_probe: FreeSpaceProbe | None = None
) -> None:
    """Write to ``<path>.tmp.<pid>``, fsync, then rename over ``path`` (never a torn file).

    Raises :class:`~tplr.comms.errors.InsufficientSpace` (folder, bytes needed, bytes free)
    before writing when the disk is too small, or when it fills up during the write; the
    temporary file is removed and an older file under ``path`` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create checkpoint folder {path.parent}: {exc}",
            hint="check the path and its permissions",
        ) from exc
    needed = estimated_bytes(state)
    free = (free_space_probe or free_bytes)(path.parent)
    if free < needed:
        raise _space_error(path.parent, needed, free)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        fsync_path(path.parent)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full(exc):
            raise _space_error(path.parent, needed, free_bytes(path.parent)) from exc
        if isinstance(exc, RuntimeError):
            raise
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc}",
            hint="check free disk space and permissions",
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` onto the CPU and check the format header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the --resume path")
    try:
        # mmap: ranks that each read the file share its pages and touch only what they use
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects outside the safe set (tensors, plain values): "
            f"{str(exc).splitlines()[0]}",
            hint="only load checkpoints written by tplr; never trust pickled code",
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable or truncated: {exc}",
            hint="use an older checkpoint; a crash cannot leave a torn file, so check the disk",
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a tplr training checkpoint",
            hint="pass a file written by save_checkpoint / --save",
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {state.get('version')}, this tplr reads "
            f"{CHECKPOINT_VERSION}",
            hint="use the tplr release that wrote it",
        )
    return state
