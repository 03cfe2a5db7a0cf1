"""The worker's full training state as one checkpoint dict, from and to any parallelism.

The dict is always the whole, unsharded state (see :mod:`tplr.train.checkpoint`): under
FSDP2 every sharded tensor is gathered (a collective, in parameter order on every rank)
and rank 0 keeps the copies; on load every rank takes its rows. So a checkpoint written by
8 FSDP2 ranks loads on 1, 2 or 8 ranks, under DDP or FSDP2, and the other way round.

Optimizer state is data only: moments, momentum buffers and step counts. The saved
``param_groups`` are not loaded; the running optimizer's own groups (its ``fused`` /
``foreach`` implementation, and today's hyperparameters) stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tplr.train import checkpoint as ckpt
from tplr.train.errors import CheckpointError, UpdateError
from tplr.train.optim import optimizer_names, refresh_hyperparameters
from tplr.train.parallel import params as param_ops
from tplr.train.parallel.sharding import as_sharded_like, full_tensor, is_sharded, local_rows

if TYPE_CHECKING:
    from tplr.train.worker import TrainWorker


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in ``state_dict`` index order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, *, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole onto the CPU."""
    saved = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for index in sorted(saved["state"]):
        entry = {}
        for key in sorted(saved["state"][index]):
            value = saved["state"][index][key]
            if isinstance(value, torch.Tensor):
                value = full_tensor(value)  # all-gather under FSDP2
                value = value.detach().to("cpu", copy=True) if keep else None
            entry[key] = value
        state[index] = entry
    return {"state": state, "param_groups": saved["param_groups"]} if keep else {}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Load moments and steps (each sharded parameter takes its rows); keep the groups."""
    params = optimizer_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        state[int(index)] = {
            key: _as_state_of(param, value) if isinstance(value, torch.Tensor) else value
            for key, value in entry.items()
        }
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(saved["param_groups"]):
        raise ValueError(
            f"{len(saved['param_groups'])} parameter groups saved, this optimizer has "
            f"{len(current)}"
        )
    groups = [
        {**mine, "params": theirs["params"]}
        for mine, theirs in zip(current, saved["param_groups"], strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _as_state_of(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if is_sharded(value) or not is_sharded(param) or value.shape != param.shape:
        return value  # a scalar step count, or a whole parameter's state
    rows = local_rows(value, param).to(param.device, non_blocking=True)
    return as_sharded_like(rows, param)


def checkpoint_state(worker: TrainWorker) -> dict[str, Any]:
    """The whole state on rank 0 (``{}`` elsewhere). A collective under FSDP2."""
    keep = worker.context.is_main
    model = param_ops.full_parameters(worker.model, keep=keep)
    names = optimizer_names(worker.optimizers)
    optimizers = {
        name: full_optimizer_state(opt, keep=keep)
        for name, opt in zip(names, worker.optimizers, strict=True)
    }
    if not keep:
        return {}
    return {
        "format": ckpt.CHECKPOINT_FORMAT,
        "version": ckpt.CHECKPOINT_VERSION,
        "step": worker.step,
        "world_size": worker.context.world_size,
        "model_config": worker.model_config.model_dump(),
        "train_config": worker.config.model_dump(),
        "model": model,
        "optimizers": optimizers,
        "scheduler": {**worker.schedule.state_dict(), "step": worker.step},
        "rng": ckpt.capture_rng_state(worker.device),
    }


def load_checkpoint(worker: TrainWorker, state: dict[str, Any], path: str | Path) -> None:
    check_model_config(worker, state["model_config"], path)
    saved = state["optimizers"]
    names = optimizer_names(worker.optimizers)
    if sorted(saved) != sorted(names):
        raise CheckpointError(
            f"checkpoint {path} was trained with optimizers {sorted(saved)}, this run "
            f"uses {sorted(names)}",
            hint="resume with the same --optimizer",
        )
    try:
        param_ops.restore_parameters(worker.model, state["model"])
        for name, optimizer in zip(names, worker.optimizers, strict=True):
            load_optimizer_state(optimizer, saved[name])
    except (RuntimeError, ValueError, KeyError, IndexError, UpdateError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc
    refresh_hyperparameters(worker.optimizers, worker.config)
    worker.step = int(state["step"])
    ckpt.restore_rng_state(state["rng"], worker.device)


def check_model_config(worker: TrainWorker, saved: dict, path: str | Path) -> None:
    """Refuse a checkpoint of another shape (fields it predates count as their defaults)."""
    current = worker.model_config.model_dump()
    defaults = type(worker.model_config).model_fields
    differing = sorted(
        key for key in current if saved.get(key, defaults[key].default) != current[key]
    )
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} != {current[k]!r}" for k in differing)
        raise CheckpointError(
            f"checkpoint {path} is for a different model ({detail})",
            hint="use the --model preset and --vocab-size the checkpoint was trained with",
        )
