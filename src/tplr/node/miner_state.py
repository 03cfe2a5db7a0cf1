"""Durable miner state: error feedback and the inner optimizer survive a restart.

After a window's payload is computed, every rank writes its own rows of the error-feedback
buffers and of the optimizer state (``tplr.train.parallel.sharded_state``) into
``<home>/cache/<uid>/miner-state/w<window>.tmp/`` (the node's local folder). Once every
rank has written, rank 0 adds ``state.json`` (run, window, the model digest the window
started from, world size, model and compression settings), renames the folder to
``w<window>``, points ``latest.json`` at it and deletes older folders. A crash at any
moment leaves ``latest.json`` naming a complete folder (or none).

On restart, after the node has synced the global model, rank 0 reads ``latest.json`` and
keeps the state only when it matches: the same run, model and compression settings and
optimizer, a window not in the future, and the model digest of that window equal to the
one this node just replayed through (the same model history). A different world size is
fine: every rank reads the rows it now owns from the old ranks' files. Anything else (a
mismatch, a torn or tampered file) is logged and the miner starts with fresh state; a
miner never stops over its own saved state. A state saved in the current window means that
window's payload was already made: the miner skips to the next window.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tplr.comms.errors import InsufficientSpace
from tplr.node.ranks import LoadState, Ranks
from tplr.protocol.run_spec import RunSpec
from tplr.train.checkpoint import fsync_path
from tplr.train.compression import CompressedTensor, CompressionError, ErrorFeedbackCompressor
from tplr.train.errors import CheckpointError
from tplr.train.optim import optimizer_names
from tplr.train.parallel.compression_dist import compress_across_ranks
from tplr.train.parallel.distributed import DistContext
from tplr.train.parallel.sharded_state import (
    PieceIndex,
    StateFileError,
    compressor_pieces,
    load_compressor_pieces,
    load_worker_pieces,
    worker_pieces,
    write_piece_file,
)
from tplr.train.worker import TrainWorker
from tplr.untrusted import MalformedInput, load_json

log = logging.getLogger(__name__)

STATE_FORMAT = "tplr-miner-state"
STATE_VERSION = 1
POINTER = "latest.json"
MANIFEST = "state.json"
MAX_MANIFEST_BYTES = 1 << 20
STATE_FOLDER = "miner-state"
_FOLDER_NAME = re.compile(r"w[0-9]{12}")


@dataclass(frozen=True)
class SavedState:
    """A complete saved state that matches this run (found by :meth:`MinerState.find`)."""

    folder: Path
    window: int
    world_size: int


class MinerState:
    """Save and restore one miner's state (every rank holds one, with its own context)."""

    def __init__(self, cache_dir: Path, spec: RunSpec, *, every_windows: int = 1) -> None:
        self.root = Path(cache_dir) / STATE_FOLDER  # cache_dir: the node's <home>/cache/<uid>
        self.spec = spec
        self.every_windows = every_windows
        self.resumed_window: int | None = None  # the window of the loaded state

    # -- identity ----------------------------------------------------------------------
    def identity(self, worker: TrainWorker) -> dict[str, Any]:
        """What a saved state must share with this miner to be loaded."""
        settings = self.spec.compression_settings()
        return {
            "run_id": self.spec.run_id,
            "model": worker.model_config.model_dump(mode="json"),
            "optimizers": optimizer_names(worker.optimizers),
            "compression": {
                "chunk_size": settings.chunk_size,
                "topk": settings.topk,
                "error_feedback_beta": settings.error_feedback_beta,
            },
        }

    def already_done(self, window: int) -> bool:
        """True when the loaded state was saved after this window's payload."""
        return self.resumed_window is not None and window <= self.resumed_window

    # -- saving (every rank; a collective under torchrun) -------------------------------
    def due(self, window: int) -> bool:
        return self.every_windows > 0 and window % self.every_windows == 0

    def save(
        self,
        window: int,
        worker: TrainWorker,
        compressor: ErrorFeedbackCompressor,
        *,
        base_digest: str | None,
    ) -> bool:
        """Write this window's state if it is due. Every rank calls (rank 0 with the digest
        of the model the window started from). Returns True when a state was committed.

        A failure (full disk, unwritable folder) is logged, never raised: the miner goes on
        and the previous state stays the latest."""
        if not self.due(window):
            return False
        context = worker.context
        staging = self.root / f"w{window:012d}.tmp"
        wrote = self._write_rank_file(staging, context.rank, worker, compressor)
        if context.distributed:
            flag = torch.tensor([int(wrote)], device=worker.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank's verdict, everywhere
            wrote = bool(flag.item())
        if not context.is_main:
            return wrote
        if not wrote:
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return self._commit(staging, window, worker, base_digest)

    def _write_rank_file(
        self, staging: Path, rank: int, worker: TrainWorker, compressor: ErrorFeedbackCompressor
    ) -> bool:
        pieces = {**worker_pieces(worker), **compressor_pieces(compressor)}
        try:
            staging.mkdir(parents=True, exist_ok=True)
            write_piece_file(staging / f"rank{rank}.safetensors", pieces)
        except (OSError, StateFileError, InsufficientSpace) as exc:
            log.error("rank %d: could not save the miner state: %s", rank, exc)
            return False
        return True

    def _commit(self, staging: Path, window: int, worker: TrainWorker, digest: str | None) -> bool:
        manifest = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "window": window,
            "base_digest": digest,
            "world_size": worker.context.world_size,
            "saved_at_s": time.time(),
            **self.identity(worker),
        }
        final = self.root / f"w{window:012d}"
        try:
            _write_json_atomic(staging / MANIFEST, manifest)
            shutil.rmtree(final, ignore_errors=True)  # a state of this window saved before
            staging.replace(final)
            _write_json_atomic(self.root / POINTER, {"folder": final.name})
        except OSError as exc:
            log.error("could not commit the miner state of window %d: %s", window, exc)
            shutil.rmtree(staging, ignore_errors=True)
            return False
        for old in self.root.iterdir():
            if old.is_dir() and old.name != final.name and old.name.startswith("w"):
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved the miner state of window %d", window)
        return True

    # -- finding and loading -------------------------------------------------------------
    def find(
        self, worker: TrainWorker, digests: Mapping[int, str], current_window: int
    ) -> SavedState | None:
        """Rank 0: the latest saved state if it matches this miner (else None, logged)."""
        try:
            found, reason = self._match(worker, digests, current_window)
        except (StateFileError, MalformedInput, OSError) as exc:
            found, reason = None, f"unreadable: {exc}"
        if found is None:
            if reason:
                log.warning("not resuming the saved miner state (%s): starting fresh", reason)
            return None
        return found

    def _match(
        self, worker: TrainWorker, digests: Mapping[int, str], current_window: int
    ) -> tuple[SavedState | None, str]:
        pointer_path = self.root / POINTER
        if not pointer_path.is_file():
            return None, ""
        pointer = _read_json(pointer_path)
        folder_name = pointer.get("folder") if isinstance(pointer, dict) else None
        if not isinstance(folder_name, str) or not _FOLDER_NAME.fullmatch(folder_name):
            return None, f"{pointer_path} names no state folder"
        folder = self.root / folder_name
        manifest = _read_json(folder / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("format") != STATE_FORMAT:
            return None, f"{folder} is not a miner state"
        if manifest.get("version") != STATE_VERSION:
            return None, f"version {manifest.get('version')!r}, this tplr writes {STATE_VERSION}"
        for key, value in self.identity(worker).items():
            if manifest.get(key) != value:
                return None, f"it was saved with another {key}: {manifest.get(key)!r}"
        window, world = manifest.get("window"), manifest.get("world_size")
        if type(window) is not int or type(world) is not int or window < 0 or world < 1:
            return None, f"{folder / MANIFEST} has no valid window and world size"
        if window > current_window:
            return None, f"it is of window {window}, after the current window {current_window}"
        ours = digests.get(window)
        if ours is None or ours != manifest.get("base_digest"):
            detail = "unknown here" if ours is None else ours
            return None, (
                f"window {window} started from model {manifest.get('base_digest')}, "
                f"this node's model of that window is {detail}"
            )
        return SavedState(folder, window, world), ""

    def load(
        self,
        saved: SavedState,
        worker: TrainWorker,
        compressor: ErrorFeedbackCompressor,
    ) -> bool:
        """Every rank: read its rows of ``saved`` (any saved world size). A collective under
        torchrun: unless every rank loaded, every rank starts fresh (returns False)."""
        files = [saved.folder / f"rank{r}.safetensors" for r in range(saved.world_size)]
        shapes = {name: p.shape for name, p in worker.model.named_parameters()}
        step_before = worker.step
        try:
            index = PieceIndex.open(files)
            load_compressor_pieces(compressor, index, shapes, worker.device)
            load_worker_pieces(worker, index)
            loaded = True
        except (StateFileError, CompressionError, CheckpointError, ValueError, KeyError) as exc:
            log.error("could not load the saved miner state %s: %s", saved.folder, exc)
            loaded = False
        if worker.context.distributed:
            flag = torch.tensor([int(loaded)], device=worker.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            loaded = bool(flag.item())
        if not loaded:
            compressor.reset()
            worker.reset_optimizer_state()
            worker.step = step_before
            return False
        self.resumed_window = saved.window
        if worker.context.is_main:
            moved = (
                ""
                if saved.world_size == worker.context.world_size
                else (f", re-sharded from {saved.world_size} to {worker.context.world_size} ranks")
            )
            log.info("resumed the miner state of window %d%s", saved.window, moved)
        return True


def _read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc}") from exc
    return load_json(data, what=str(path), max_bytes=MAX_MANIFEST_BYTES)


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            json.dump(value, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


# -- the miner's window computation (rank 0 and the torchrun followers alike) -----------------
def miner_compressor(
    spec: RunSpec, context: DistContext, *, offload: bool = False
) -> ErrorFeedbackCompressor:
    """This rank's share of the error feedback (the whole of it in one process)."""
    return ErrorFeedbackCompressor(
        spec.compression_settings(),
        rank=context.rank,
        world_size=context.world_size,
        offload=offload,
    )


def compress_and_save(
    worker: TrainWorker,
    compressor: ErrorFeedbackCompressor,
    state: MinerState,
    window: int,
    delta: Mapping[str, torch.Tensor],
    *,
    base_digest: str | None,
) -> dict[str, CompressedTensor]:
    """The whole payload of ``window`` (every rank), then the state saved when due.
    Blocking, and a collective under torchrun: every rank calls it for every window."""
    compressed = compress_across_ranks(compressor, delta)
    state.save(window, worker, compressor, base_digest=base_digest)
    return compressed


def resume(
    state: MinerState,
    worker: TrainWorker,
    compressor: ErrorFeedbackCompressor,
    ranks: Ranks,
    digests: Mapping[int, str],
    window: int,
) -> None:
    """Rank 0, after joining at ``window``: load the saved state if it matches, on every
    rank. Blocking (a collective with torchrun followers)."""
    saved = state.find(worker, digests, window)
    if saved is None:
        return
    if ranks.has_followers:
        ranks.send(LoadState(str(saved.folder), saved.window, saved.world_size))
    state.load(saved, worker, compressor)
