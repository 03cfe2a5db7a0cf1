"""Whole-parameter operations the node uses between windows: snapshot, restore, the
pseudo-gradient ``Δ = θ_start − θ_end`` and the outer update ``θ ← θ − lr·Δ``.

Tensors are keyed by the unwrapped model's parameter names (no ``module.`` / ``_orig_mod.``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tplr.train.errors import UpdateError

ParameterDict = dict[str, torch.Tensor]


def _first(names: list[str], shown: int = 3) -> str:
    return str(names[:shown]) + ("..." if len(names) > shown else "")


def check_matches(tensors: Mapping[str, torch.Tensor], model: nn.Module, what: str) -> None:
    """Raise UpdateError unless ``tensors`` has exactly the model's names and shapes."""
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
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise UpdateError(
                f"{what} tensor {name!r} has shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(params[name].shape)}",
                hint="it was made for a different model config",
            )


@torch.no_grad()
def snapshot_parameters(model: nn.Module, device: torch.device) -> ParameterDict:
    """Copy every parameter to CPU memory (pinned when training on CUDA)."""
    on_cuda = device.type == "cuda"
    snapshot: ParameterDict = {}
    for name, param in model.named_parameters():
        copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=on_cuda)
        copy.copy_(param, non_blocking=on_cuda)
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
        param.copy_(snapshot[name], non_blocking=True)
        on_cuda = on_cuda or param.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()  # the caller may reuse the snapshot buffers right away


@torch.no_grad()
def pseudo_gradient(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> ParameterDict:
    """``Δ = θ_snapshot − θ_now`` per parameter, on the model's device."""
    check_matches(snapshot, model, "snapshot")
    return {
        name: snapshot[name].to(param.device, non_blocking=True) - param
        for name, param in model.named_parameters()
    }


def _check_finite(delta: Mapping[str, torch.Tensor]) -> None:
    if not delta:
        return
    where = next(iter(delta.values())).device
    flags = torch.stack([torch.isfinite(t).all().to(where) for t in delta.values()])
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
    _check_finite(delta)
    for name, param in model.named_parameters():
        param.sub_(delta[name].to(param.device, param.dtype, non_blocking=True), alpha=lr)
