"""Optimizers (AdamW, or Muon + AdamW) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tplr.train.config import TrainConfig
from tplr.train.muon import Muon


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """lr factor: linear warmup to 1, cosine to ``min_ratio`` at ``total_steps``, then flat."""

    warmup_steps: int
    total_steps: int
    min_ratio: float

    @classmethod
    def from_config(cls, config: TrainConfig) -> WarmupCosineSchedule:
        return cls(config.warmup_steps, config.total_steps, config.min_lr_ratio)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine

    def apply(self, optimizers: list[torch.optim.Optimizer], step: int) -> float:
        """Set every group's lr to its base lr x factor(step); return the factor."""
        factor = self.factor(step)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        return factor

    def state_dict(self) -> dict[str, float | int]:
        return {
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_ratio": self.min_ratio,
        }


def _is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    return param.ndim == 2 and name.startswith("blocks.")


def _adamw(groups: list[dict], config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def build_optimizers(
    model: nn.Module, config: TrainConfig, *, device: torch.device
) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for 2-D hidden weights and AdamW for the rest.

    Weight decay applies to matrices (embedding and head included), never to norm gains.
    """
    on_cuda = device.type == "cuda"
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_params = [p for n, p in named if config.optimizer == "muon" and _is_hidden_matrix(n, p)]
    muon_ids = {id(p) for p in muon_params}
    rest = [(n, p) for n, p in named if id(p) not in muon_ids]
    decay = [p for _, p in rest if p.ndim >= 2]
    no_decay = [p for _, p in rest if p.ndim < 2]
    adamw_groups = [
        {"params": decay, "weight_decay": config.weight_decay, "base_lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": config.lr},
    ]
    optimizers: list[torch.optim.Optimizer] = [_adamw(adamw_groups, config, fused=on_cuda)]
    if muon_params:
        muon = Muon(
            [{"params": muon_params, "base_lr": config.muon_lr}],
            lr=config.muon_lr,
            momentum=config.muon_momentum,
            weight_decay=config.weight_decay,
            ns_steps=config.muon_ns_steps,
            ns_dtype=torch.bfloat16 if on_cuda else torch.float32,
        )
        optimizers.append(muon)
    return optimizers


def optimizer_names(optimizers: list[torch.optim.Optimizer]) -> list[str]:
    return [type(opt).__name__.lower() for opt in optimizers]


def refresh_hyperparameters(optimizers: list[torch.optim.Optimizer], config: TrainConfig) -> None:
    """Put the current config's hyperparameters into (e.g. checkpoint-restored) groups.

    A resumed run keeps its moments and momentum buffers but obeys today's flags.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if isinstance(optimizer, Muon):
                group.update(
                    base_lr=config.muon_lr,
                    momentum=config.muon_momentum,
                    weight_decay=config.weight_decay,
                )
            else:
                decayed = any(p.ndim >= 2 for p in group["params"])
                group.update(
                    base_lr=config.lr,
                    betas=(config.beta1, config.beta2),
                    eps=config.eps,
                    weight_decay=config.weight_decay if decayed else 0.0,
                )
