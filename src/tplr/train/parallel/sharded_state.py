"""State that outlives the process, written by every rank for its own rows, read back by
any number of ranks.

A *piece file* (safetensors, no pickle) holds, for each named tensor, the rows
``[start, start + n)`` of a tensor of ``total_rows`` rows (dim 0), plus a JSON header saying
so. Each rank writes the rows it owns: its FSDP2 shard of an optimizer moment, its chunk
range of an error-feedback buffer; a tensor every rank holds alike (DDP's optimizer state,
a step count) is written by rank 0 alone. :class:`PieceIndex` opens the files of all
ranks and reads any row range, taking only the overlapping slices from each file, so a
state written by 4 ranks loads on 1, 2 or 8.

The files live on the node's own disk but a local user could swap them, so the header is
parsed as untrusted input and every range is checked before a byte is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tplr.comms.diskspace import FreeSpaceProbe, free_bytes
from tplr.comms.errors import InsufficientSpace
from tplr.errors import TplrError
from tplr.train.checkpoint import fsync_path
from tplr.train.optim import optimizer_names
from tplr.train.parallel.sharding import as_sharded_like, is_sharded, local_part, shard_rows
from tplr.train.parallel.worker_state import load_optimizer_state, optimizer_params
from tplr.untrusted import MalformedInput, load_json

if TYPE_CHECKING:
    from tplr.train.compression import ErrorFeedbackCompressor
    from tplr.train.worker import TrainWorker

HEADER_KEY = "tplr_pieces"
MAX_HEADER_BYTES = 16 << 20
WHOLE = -1  # total_rows of a tensor stored whole (a scalar)


class StateFileError(TplrError):
    """A saved state file is missing, unreadable or inconsistent."""

    hint = "the saved state is ignored; delete the folder if this repeats"


@dataclass(frozen=True)
class RowPiece:
    """Rows ``[start, start + len(tensor))`` of a tensor with ``total_rows`` rows."""

    tensor: torch.Tensor
    start: int = 0
    total_rows: int = WHOLE

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> RowPiece:
        if tensor.ndim == 0:
            return cls(tensor, 0, WHOLE)
        return cls(tensor, 0, tensor.shape[0])


def write_piece_file(
    path: Path, pieces: Mapping[str, RowPiece], *, free_space_probe: FreeSpaceProbe | None = None
) -> None:
    """Atomically write ``pieces`` (tmp, fsync, rename). Raises InsufficientSpace early."""
    tensors = {name: piece.tensor.detach().to("cpu").contiguous() for name, piece in pieces.items()}
    header = {name: [piece.start, piece.total_rows] for name, piece in pieces.items()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    free = (free_space_probe or free_bytes)(path.parent)
    if free < needed:
        raise InsufficientSpace(str(path.parent), needed, free)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
        fsync_path(tmp)
        tmp.replace(path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise StateFileError(f"could not write {path}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Located:
    path: Path
    start: int
    rows: int


class PieceIndex:
    """Which file holds which rows of every tensor, over the piece files of all ranks."""

    def __init__(self, located: dict[str, list[_Located]], totals: dict[str, int]) -> None:
        self._located = located
        self._totals = totals

    @classmethod
    def open(cls, paths: Iterable[Path]) -> PieceIndex:
        located: dict[str, list[_Located]] = {}
        totals: dict[str, int] = {}
        for path in paths:
            for name, start, rows, total in _read_header(path):
                if totals.setdefault(name, total) != total:
                    raise StateFileError(
                        f"{path}: {name!r} has {total} rows, elsewhere {totals[name]}"
                    )
                located.setdefault(name, []).append(_Located(path, start, rows))
        return cls(located, totals)

    def names(self) -> set[str]:
        return set(self._located)

    def total_rows(self, name: str) -> int:
        return self._totals[name]

    def read_whole(self, name: str) -> torch.Tensor:
        total = self._totals.get(name)
        if total == WHOLE:
            return _load_slice(self._located[name][0].path, name, None)
        return self.read_rows(name, 0, self._need(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name``, from whichever files hold them."""
        total = self._need(name)
        if not 0 <= start <= stop <= total:
            raise StateFileError(f"rows [{start}, {stop}) of {name!r} are outside [0, {total})")
        parts, covered = [], start
        for where in sorted(self._located[name], key=lambda w: w.start):
            lo, hi = max(covered, where.start), min(stop, where.start + where.rows)
            if lo >= hi:
                continue
            if lo != covered:
                break  # a gap: fails below
            parts.append(_load_slice(where.path, name, (lo - where.start, hi - where.start)))
            covered = hi
        if covered != stop:
            raise StateFileError(f"rows [{covered}, {stop}) of {name!r} are in no saved file")
        if not parts:
            return _load_slice(self._located[name][0].path, name, (0, 0))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _need(self, name: str) -> int:
        if name not in self._located:
            raise StateFileError(f"the saved state has no {name!r}")
        return self._totals[name]


def _read_header(path: Path) -> list[tuple[str, int, int, int]]:
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()  # the handle is not iterable
            shapes = {name: handle.get_slice(name).get_shape() for name in names}
    except (OSError, SafetensorError) as exc:
        raise StateFileError(f"cannot read {path}: {exc}") from exc
    try:
        header = load_json(
            metadata.get(HEADER_KEY, ""), what=f"{path} header", max_bytes=MAX_HEADER_BYTES
        )
    except MalformedInput as exc:
        raise StateFileError(exc.message) from None
    if not isinstance(header, dict) or set(header) != set(shapes):
        raise StateFileError(f"{path}: the header does not list exactly the stored tensors")
    found = []
    for name, entry in header.items():
        ok = isinstance(entry, list) and len(entry) == 2 and all(type(v) is int for v in entry)
        if not ok:
            raise StateFileError(f"{path}: bad header entry for {name!r}")
        start, total = entry
        shape = shapes[name]
        rows = shape[0] if shape else 0
        whole = total == WHOLE and start == 0 and not shape
        if not whole and not (start >= 0 and shape and start + rows <= total):
            raise StateFileError(f"{path}: {name!r} rows [{start}, {start + rows}) exceed {total}")
        found.append((name, start, rows, total))
    return found


def _load_slice(path: Path, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
    try:
        with safe_open(str(path), "pt") as handle:
            if rows is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows[0] : rows[1]]
    except (OSError, SafetensorError) as exc:
        raise StateFileError(f"cannot read {name!r} from {path}: {exc}") from exc


# -- what the worker and the compressor contribute ------------------------------------------
def _param_names(worker: TrainWorker) -> dict[int, str]:
    return {id(param): name for name, param in worker.model.named_parameters()}


def worker_pieces(worker: TrainWorker) -> dict[str, RowPiece]:
    """Optimizer moments (FSDP2: this rank's rows; else rank 0 writes them whole) and the
    step count, keyed ``opt/<optimizer>/<parameter>/<key>`` and ``worker/step``."""
    context = worker.context
    names = _param_names(worker)
    pieces: dict[str, RowPiece] = {}
    if context.is_main:
        pieces["worker/step"] = RowPiece.whole(torch.tensor(worker.step, dtype=torch.int64))
    for opt_name, optimizer in zip(
        optimizer_names(worker.optimizers), worker.optimizers, strict=True
    ):
        for param in optimizer_params(optimizer):
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                name = f"opt/{opt_name}/{names[id(param)]}/{key}"
                if is_sharded(value):
                    start, _ = shard_rows(value.shape[0], context.rank, context.world_size)
                    pieces[name] = RowPiece(local_part(value), start, value.shape[0])
                elif context.is_main:
                    pieces[name] = RowPiece.whole(value)
    return pieces


def load_worker_pieces(worker: TrainWorker, index: PieceIndex) -> None:
    """Load moments and the step written by any number of ranks into this worker."""
    context = worker.context
    names = _param_names(worker)
    for opt_name, optimizer in zip(
        optimizer_names(worker.optimizers), worker.optimizers, strict=True
    ):
        state: dict[int, dict[str, Any]] = {}
        for position, param in enumerate(optimizer_params(optimizer)):
            prefix = f"opt/{opt_name}/{names[id(param)]}/"
            keys = sorted(n[len(prefix) :] for n in index.names() if n.startswith(prefix))
            entry = {}
            for key in keys:
                full_name = prefix + key
                if is_sharded(param) and index.total_rows(full_name) == param.shape[0]:
                    start, stop = shard_rows(param.shape[0], context.rank, context.world_size)
                    rows = index.read_rows(full_name, start, stop).to(param.device)
                    entry[key] = as_sharded_like(rows, param)
                else:
                    entry[key] = index.read_whole(full_name)
            if entry:
                state[position] = entry
        groups = optimizer.state_dict()["param_groups"]
        load_optimizer_state(optimizer, {"state": state, "param_groups": groups})
    worker.step = int(index.read_whole("worker/step").item())


def compressor_pieces(compressor: ErrorFeedbackCompressor) -> dict[str, RowPiece]:
    """This rank's chunk rows of every error-feedback buffer, keyed ``ef/<parameter>``."""
    return {
        f"ef/{name}": RowPiece(rows, start, compressor.settings.chunk_count(shape.numel()))
        for name, (rows, start, shape) in compressor.owned_rows().items()
    }


def load_compressor_pieces(
    compressor: ErrorFeedbackCompressor,
    index: PieceIndex,
    shapes: Mapping[str, torch.Size],
    device: torch.device,
) -> None:
    """This rank's chunk rows of every saved error buffer (``shapes``: the parameters')."""
    for name in sorted(n[len("ef/") :] for n in index.names() if n.startswith("ef/")):
        if name not in shapes:
            raise StateFileError(f"the saved error feedback has {name!r}, the model has not")
        start, stop = compressor.chunk_range(shapes[name].numel())
        compressor.load_rows(name, shapes[name], index.read_rows(f"ef/{name}", start, stop), device)
