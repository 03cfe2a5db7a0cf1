"""Cross-entropy of the output head, optionally in chunks of tokens (no full logits).

With a vocabulary of 128k–262k, the logits of one micro-batch (tokens x V, plus their fp32
copy and their gradient) outweigh every other activation. :class:`ChunkedLinearCrossEntropy`
computes the head matmul, the loss *and* its gradients chunk by chunk in the forward pass,
so at most one chunk of logits exists at a time and nothing of them is kept for the
backward pass; the backward pass only scales the stored gradients. No matmul is repeated.

Targets equal to :data:`IGNORE_INDEX` contribute nothing (the padding of a fixed-shape
evaluation batch). ``reduction="mean"`` divides by the number of counted targets.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum"]

AUTO_CHUNK_LOGITS_BYTES = 512 << 20
"""Auto mode chunks the loss when one micro-batch's fp32 logits exceed this."""
AUTO_CHUNK_TARGET_BYTES = 256 << 20
"""...into chunks whose fp32 logits are about this large."""


def auto_chunk_tokens(tokens: int, padded_vocab: int, setting: int | None) -> int | None:
    """Tokens per loss chunk for a micro-batch of ``tokens``, or None for the plain loss.

    ``setting``: None = auto, 0 = never chunk, N = chunks of N tokens.
    """
    if setting == 0:
        return None
    if setting is not None:
        return setting if setting < tokens else None
    if tokens * padded_vocab * 4 <= AUTO_CHUNK_LOGITS_BYTES:
        return None
    chunk = max(64, AUTO_CHUNK_TARGET_BYTES // (padded_vocab * 4) // 64 * 64)
    return chunk if chunk < tokens else None


def head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int | None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``. hidden: (N, C),
    weight: (V, C), targets: (N,) int64. Returns a float32 scalar."""
    if chunk_tokens is None:
        logits = F.linear(hidden, weight)  # (N, V)
        return F.cross_entropy(
            logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction
        )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, reduction)
    return _chunked_loss_no_grad(hidden, weight, targets, chunk_tokens, reduction)


def _counted(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum().to(torch.float32)


def _chunked_loss_no_grad(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, reduction: str
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], weight).float()  # (chunk, V)
        total += F.cross_entropy(
            logits, targets[start : start + chunk], ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total / _counted(targets) if reduction == "mean" else total


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients of the head, chunk by chunk, in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, reduction: str):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        scale = 1.0 / _counted(targets) if reduction == "mean" else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, t = hidden[rows], targets[rows]  # (n, C), (n,)
            logits = F.linear(h, weight).float()  # (n, V): the only chunk alive
            loss, grad_logits = _summed_loss_and_grad_(logits, t)  # grad overwrites logits
            total += loss
            if scale is not None:
                grad_logits *= scale
            grad_logits = grad_logits.to(weight.dtype)  # autocast recasts the matmuls below
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight).to(hidden.dtype)  # (n, C)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()  # (V, C)
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight))
        )
        ctx.weight_dtype = weight.dtype
        return total * scale if scale is not None else total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if need_hidden else None,
            (grad_weight * grad_output).to(ctx.weight_dtype) if need_weight else None,
            None,
            None,
            None,
        )


def _summed_loss_and_grad_(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of fp32 ``logits`` (n, V) and its gradient softmax − one_hot, computed in
    the logits' own memory. Ignored targets add no loss and get zero rows."""
    counted = targets != IGNORE_INDEX  # (n,)
    safe = torch.where(counted, targets, 0).unsqueeze(1)  # (n, 1)
    log_norm = logits.logsumexp(dim=-1)  # (n,)
    picked = logits.gather(1, safe).squeeze(1)  # (n,)
    loss = ((log_norm - picked) * counted).sum()
    grad = logits.sub_(log_norm.unsqueeze(1)).exp_()  # softmax, in place
    grad.mul_(counted.unsqueeze(1))
    grad.scatter_add_(1, safe, -counted.unsqueeze(1).to(grad.dtype))
    return loss, grad
