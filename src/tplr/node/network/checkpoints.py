"""The lead validator's checkpoints of the global model, with a ``latest`` pointer.

``checkpoints/{w}.safetensors`` holds the model parameters at the *start* of window ``w``
(every aggregate of windows ``< w`` applied), as float tensors in safetensors (no pickle,
so loading a peer's file can never run code), with metadata: format, run id, window,
model digest, code version. ``checkpoints/latest.json`` points at the newest one and is
written after it, so a reader never sees a pointer to a missing file. Files go through the
transfer engine (multipart for large models) via a scratch file, written atomically.

The model digest (xxh3-128 over the parameters in name order) is how nodes compare models:
honest nodes that applied the same aggregates hold bit-identical parameters.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tplr import __version__
from tplr.comms.diskspace import FreeSpaceProbe, check_free_space, free_bytes
from tplr.comms.download.engine import download
from tplr.comms.errors import InsufficientSpace, NotFound, StoreError
from tplr.comms.retry import retry
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics
from tplr.comms.upload import upload_file
from tplr.errors import ConfigError, TplrError
from tplr.untrusted import MalformedInput, load_model

log = logging.getLogger(__name__)

CHECKPOINTS_PREFIX = "checkpoints/"
LATEST_KEY = "checkpoints/latest.json"
CHECKPOINT_FORMAT = "tplr-global-checkpoint"
_CHECKPOINT_KEY = re.compile(r"^checkpoints/(\d+)\.safetensors$")
_HEADER_ROOM_BYTES = 1 << 20
_MAX_POINTER_BYTES = 4096


class GlobalCheckpointError(TplrError):
    """A published checkpoint is missing, malformed, or not for this run and model."""

    hint = "wait for the lead validator's next checkpoint, or ask its operator"


class CheckpointPointer(BaseModel):
    """``checkpoints/latest.json``."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    format: str = CHECKPOINT_FORMAT
    run_id: str = Field(max_length=64)
    window: int = Field(ge=0, lt=1 << 40)
    key: str = Field(pattern=r"^checkpoints/(0|[1-9][0-9]{0,12})\.safetensors$")
    size_bytes: int = Field(ge=0, lt=1 << 44)
    model_digest: str = Field(max_length=128)
    created_at_s: float = Field(ge=0)


def checkpoint_key(window: int) -> str:
    return f"{CHECKPOINTS_PREFIX}{window}.safetensors"


def model_digest(params: Mapping[str, torch.Tensor]) -> str:
    """xxh3-128 of every parameter's bytes (CPU, contiguous) in name order."""
    hasher = xxhash.xxh3_128()
    for name in sorted(params):
        tensor = params[name].detach().to("cpu").contiguous()
        hasher.update(name.encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes())
    return "xxh3_128:" + hasher.hexdigest()


def checkpoint_bytes(params: Mapping[str, torch.Tensor]) -> int:
    """The size of the checkpoint file of ``params`` (tensor bytes plus a header bound)."""
    data = sum(t.numel() * t.element_size() for t in params.values())
    return data + _HEADER_ROOM_BYTES + 256 * len(params)


def write_checkpoint_file(
    params: Mapping[str, torch.Tensor],
    path: Path,
    *,
    run_id: str,
    window: int,
    digest: str,
    free_space_probe: FreeSpaceProbe | None = None,
) -> None:
    """Atomic safetensors file (tmp + rename). Blocking: run it in a worker thread.

    A full disk is an :class:`InsufficientSpace` naming the folder and the bytes needed,
    checked before writing and caught while writing; the temp file never stays behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = checkpoint_bytes(params)
    check_free_space(path.parent, needed, free_space_probe)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "run_id": run_id,
        "window": str(window),
        "model_digest": digest,
        "code_version": __version__,
    }
    try:
        save_file({n: t.detach().cpu().contiguous() for n, t in params.items()}, tmp, metadata)
        tmp.replace(path)
    except (OSError, SafetensorError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if isinstance(exc, SafetensorError) and not _looks_like_full_disk(exc, path.parent):
            raise
        raise InsufficientSpace(
            str(path.parent),
            needed,
            (free_space_probe or free_bytes)(path.parent),
            hint="free disk space in the node's cache folder (TPLR_HOME) or move it to a "
            "larger disk; the checkpoint was not written",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _looks_like_full_disk(exc: SafetensorError, folder: Path) -> bool:
    """safetensors reports a short write as e.g. 'unexpected pos': ask the filesystem."""
    text = str(exc).lower()
    return "no space" in text or "unexpected pos" in text or free_bytes(folder) < 1 << 20


def load_init_model(path: Path, param_shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Parameters to start a run from: a checkpoint file of this format (e.g. the latest of
    an older run). Blocking. The names, shapes and float types must match the model."""
    try:
        params = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            f"TPLR_VALIDATOR_INIT_MODEL={path} is not a readable safetensors file: {exc}",
            hint="point it at a checkpoints/<window>.safetensors file of a tplr run",
        ) from None
    _check_params(params, param_shapes, where=f"the initial model {path}")
    return params


def _check_params(
    params: Mapping[str, torch.Tensor], param_shapes: Mapping[str, tuple[int, ...]], *, where: str
) -> None:
    missing = sorted(set(param_shapes) - set(params))
    extra = sorted(set(params) - set(param_shapes))
    if missing or extra:
        raise GlobalCheckpointError(
            f"{where} does not match the model: missing {missing[:3]}, unknown {extra[:3]}"
        )
    for name, shape in param_shapes.items():
        if tuple(params[name].shape) != tuple(shape) or not params[name].is_floating_point():
            raise GlobalCheckpointError(
                f"{where}: {name} is {params[name].dtype} {tuple(params[name].shape)}, "
                f"the model needs a float tensor of shape {tuple(shape)}"
            )
        if not bool(torch.isfinite(params[name]).all()):
            raise GlobalCheckpointError(f"{where}: {name} holds NaN or infinity")


def read_checkpoint_file(
    path: Path, pointer: CheckpointPointer, param_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Load and check a downloaded checkpoint. Blocking: run it in a worker thread."""
    where = f"checkpoint {pointer.key} of run {pointer.run_id}"
    try:
        params = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise GlobalCheckpointError(f"{where} is not a readable safetensors file: {exc}") from None
    _check_params(params, param_shapes, where=where)
    digest = model_digest(params)
    if digest != pointer.model_digest:
        raise GlobalCheckpointError(
            f"{where} has digest {digest}, its pointer says {pointer.model_digest}"
        )
    return params


def parse_pointer(data: bytes, *, source: str) -> CheckpointPointer:
    """``checkpoints/latest.json`` (bounded, strict); GlobalCheckpointError when invalid."""
    try:
        return load_model(
            data, CheckpointPointer, what=source, max_bytes=_MAX_POINTER_BYTES, max_depth=1
        )
    except MalformedInput as exc:
        raise GlobalCheckpointError(f"not a checkpoint pointer: {exc.message}") from None


async def read_latest_pointer(store: ObjectStore) -> CheckpointPointer:
    """The ``latest`` pointer; ``NotFound`` when no checkpoint was published yet."""
    info = await store.head(LATEST_KEY)
    if info.size > _MAX_POINTER_BYTES:
        raise GlobalCheckpointError(f"{store.url(LATEST_KEY)} is {info.size} bytes: too large")
    return parse_pointer(await store.get(LATEST_KEY), source=store.url(LATEST_KEY))


class CheckpointPublisher:
    """The lead's side: write, upload, point ``latest`` at it, prune old ones."""

    def __init__(
        self,
        store: ObjectStore,
        scratch_dir: Path,
        *,
        transfer: TransferConfig,
        keep: int,
        transfer_metrics: TransferMetrics | None = None,
    ) -> None:
        self.policy = transfer.retry_policy()
        self.store = store
        self.scratch_dir = scratch_dir
        self.transfer = transfer
        self.keep = keep
        self.transfer_metrics = transfer_metrics

    async def publish(
        self, params: Mapping[str, torch.Tensor], *, run_id: str, window: int, digest: str
    ) -> CheckpointPointer:
        key = checkpoint_key(window)
        path = self.scratch_dir / f"publish-{window}.safetensors"
        await asyncio.to_thread(
            write_checkpoint_file, params, path, run_id=run_id, window=window, digest=digest
        )
        try:
            result = await upload_file(
                self.store, path, key, config=self.transfer, metrics=self.transfer_metrics
            )
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        pointer = CheckpointPointer(
            run_id=run_id,
            window=window,
            key=key,
            size_bytes=result.size,
            model_digest=digest,
            created_at_s=time.time(),
        )
        await retry(
            lambda: self.store.put(LATEST_KEY, pointer.model_dump_json().encode()),
            self.policy,
            describe=f"point {self.store.url(LATEST_KEY)} at window {window}",
        )
        try:
            await self._prune(newest=window)
        except StoreError as exc:  # old checkpoints linger until the next publish
            log.warning("could not delete old checkpoints: %s", exc)
        log.info("published checkpoint %s (%d bytes)", self.store.url(key), result.size)
        return pointer

    async def _prune(self, *, newest: int) -> None:
        windows = [
            int(match.group(1))
            async for info in self.store.list(CHECKPOINTS_PREFIX)
            if (match := _CHECKPOINT_KEY.match(info.key))
        ]
        windows.sort()
        for window in windows[: max(0, len(windows) - self.keep)]:
            if window != newest:
                await self.store.delete(checkpoint_key(window))


async def fetch_checkpoint(
    store: ObjectStore,
    pointer: CheckpointPointer,
    param_shapes: Mapping[str, tuple[int, ...]],
    scratch_dir: Path,
    *,
    transfer: TransferConfig,
    transfer_metrics: TransferMetrics | None = None,
) -> dict[str, torch.Tensor]:
    """Download the checkpoint ``pointer`` names and return its checked parameters."""
    dest = scratch_dir / f"fetch-{pointer.window}.safetensors"
    try:
        await download(
            store,
            pointer.key,
            dest,
            config=transfer,
            verify="size",
            metrics=transfer_metrics,
            progress=False,
        )
        return await asyncio.to_thread(read_checkpoint_file, dest, pointer, param_shapes)
    except NotFound as exc:
        raise GlobalCheckpointError(
            f"checkpoint {store.url(pointer.key)} named by latest.json is gone: {exc.message}"
        ) from exc
    finally:
        await asyncio.to_thread(dest.unlink, missing_ok=True)
