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

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def write_checkpoint_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to ``<path>.tmp.<pid>``, fsync, then rename over ``path`` (never a torn file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create checkpoint folder {path.parent}: {exc}",
            hint="check the path and its permissions",
        ) from exc
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc}",
            hint="check free disk space and permissions",
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
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
        state = torch.load(path, map_location="cpu", weights_only=True)
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
