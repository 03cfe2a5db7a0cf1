"""Whole-parameter operations the node uses between windows: snapshot, restore, the
pseudo-gradient ``Δ = θ_start − θ_end`` and the outer update ``θ ← θ − lr·Δ``.

Tensors are keyed by the unwrapped model's parameter names (no ``module.`` / ``_orig_mod.``).
Under FSDP2 each rank works on its own rows (:mod:`tplr.train.parallel.sharding`): a snapshot holds
this rank's rows, the pseudo-gradient is a sharded ``DTensor`` per parameter, and restore and
the outer update take either full tensors (every rank slices its rows) or this rank's rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from tplr.train.errors import UpdateError
from tplr.train.parallel.sharding import as_sharded_like, is_sharded, local_part, local_rows

ParameterDict = dict[str, torch.Tensor]


def _first(names: list[str], shown: int = 3) -> str:
    return str(names[:shown]) + ("..." if len(names) > shown else "")


def check_matches(tensors: Mapping[str, torch.Tensor], model: nn.Module, what: str) -> None:
    """Raise UpdateError unless ``tensors`` has exactly the model's names, each tensor in the
    parameter's full shape or (sharded model) in the shape of this rank's rows."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise UpdateError(
            f"{what} does not match the model: missing {_first(missing)}, "
            f"unknown {_first(unknown)}",
            hint="it was made for a different model config; build both from the same ModelConfig",
        )
    for name, tensor in tensors.items():
        param = params[name]
        allowed = {tuple(param.shape), tuple(local_part(param).shape)}
        if tuple(tensor.shape) not in allowed:
            raise UpdateError(
                f"{what} tensor {name!r} has shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(param.shape)}",
                hint="it was made for a different model config",
            )


def _rows_for(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (full, sharded or this rank's rows) as this rank's rows of ``param``."""
    if is_sharded(tensor):
        return local_part(tensor)
    if is_sharded(param) and tuple(tensor.shape) == tuple(param.shape):
        return local_rows(tensor, param)
    return tensor


@torch.no_grad()
def snapshot_parameters(model: nn.Module, device: torch.device) -> ParameterDict:
    """Copy every parameter (this rank's rows when sharded) to CPU memory, pinned on CUDA."""
    on_cuda = device.type == "cuda"
    snapshot: ParameterDict = {}
    for name, param in model.named_parameters():
        piece = local_part(param)
        copy = torch.empty(piece.shape, dtype=piece.dtype, device="cpu", pin_memory=on_cuda)
        copy.copy_(piece, non_blocking=on_cuda)
        snapshot[name] = copy
    if on_cuda:
        torch.cuda.synchronize(device)  # sync point: the copies must land before use
    return snapshot


@torch.no_grad()
def restore_parameters(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Copy ``snapshot`` back into the parameters, bit for bit."""
    check_matches(snapshot, model, "snapshot")
    on_cuda = False
    for name, param in model.named_parameters():
        local_part(param).copy_(_rows_for(param, snapshot[name]), non_blocking=True)
        on_cuda = on_cuda or param.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()  # the caller may reuse the snapshot buffers right away


@torch.no_grad()
def pseudo_gradient(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> ParameterDict:
    """``Δ = θ_snapshot − θ_now`` per parameter, on the model's device (sharded like it)."""
    check_matches(snapshot, model, "snapshot")
    delta: ParameterDict = {}
    for name, param in model.named_parameters():
        mine = local_part(param)
        rows = _rows_for(param, snapshot[name]).to(mine.device, non_blocking=True) - mine
        delta[name] = as_sharded_like(rows, param)
    return delta


def _check_finite(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    if not delta:
        return
    where = next(model.parameters()).device
    flags = torch.stack([torch.isfinite(local_part(t)).all().to(where) for t in delta.values()])
    if any(is_sharded(t) for t in delta.values()):  # every rank must reach the same verdict
        flags = flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if not bool(flags.all()):  # sync point: one per update, not one per tensor
        bad = [name for name, ok in zip(delta, flags.tolist(), strict=True) if not ok]
        raise UpdateError(
            f"update holds NaN or infinite values in {bad[:3]}",
            hint="reject this update; it would destroy the model",
        )


@torch.no_grad()
def apply_update(model: nn.Module, delta: Mapping[str, torch.Tensor], lr: float) -> None:
    """``θ ← θ − lr · Δ`` for every parameter (Δ in the model's names and shapes)."""
    check_matches(delta, model, "update")
    _check_finite(model, delta)
    for name, param in model.named_parameters():
        mine = local_part(param)
        rows = _rows_for(param, delta[name])
        mine.sub_(rows.to(mine.device, mine.dtype, non_blocking=True), alpha=lr)


def full_parameters(model: nn.Module, *, keep: bool = True) -> ParameterDict:
    """Every parameter whole, copied to the CPU. A collective when sharded: every rank must
    call; ranks that pass ``keep=False`` take part in the gathers and get an empty dict."""
    out: ParameterDict = {}
    for name, param in model.named_parameters():
        whole = param.full_tensor() if is_sharded(param) else param  # (all-gather)
        if keep:
            out[name] = whole.detach().to("cpu", copy=True)
    return out
