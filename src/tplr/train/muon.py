"""Muon: SGD momentum whose update is orthogonalised by a Newton–Schulz iteration.

For 2-D hidden weights only; embeddings, the head and scalars stay on AdamW. The quintic
iteration with coefficients (3.4445, -4.7750, 2.0315) drives the singular values of the
normalised update towards ~1 in a few steps without an SVD, so it runs well in bf16.
Under DDP every rank sees the same all-reduced gradient and computes the same update.
Under FSDP2 the momentum stays sharded; the Nesterov update of each matrix is gathered
whole (Newton–Schulz needs the whole matrix), orthogonalised on every rank, and each rank
applies its own rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tplr.train.parallel.sharding import as_sharded_like, full_tensor, local_rows

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximate U Vᵀ of ``update`` = U S Vᵀ by a quintic Newton–Schulz iteration."""
    a, b, c = _NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the wide orientation: X Xᵀ is the smaller square
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum + Newton–Schulz orthogonalisation, decoupled weight decay.

    The update is scaled by ``sqrt(max(1, rows / cols))`` so tall and wide matrices move
    at a comparable rate.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                nesterov = param.grad.lerp(buffer, momentum)
                whole = orthogonalize(full_tensor(nesterov), self.ns_steps, self.ns_dtype)
                update = as_sharded_like(local_rows(whole, param), param)
                scale = max(1.0, param.size(0) / param.size(1)) ** 0.5
                if decay:
                    param.mul_(1 - lr * decay)
                param.add_(update.to(param.dtype), alpha=-lr * scale)
        return None
