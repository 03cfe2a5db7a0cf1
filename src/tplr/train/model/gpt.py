"""A GPT in plain PyTorch: rotary embeddings, RMSNorm (with QK-norm for the GPT presets),
ReLU²/GELU/SwiGLU MLP, grouped-query attention, tied or untied head, vocabulary padded to a
multiple of 128, ``scaled_dot_product_attention(is_causal=True)`` (flash kernels on H100),
per-block activation checkpointing and a chunked head loss for large vocabularies.

Shapes in comments: B batch, T sequence, C d_model, H heads, K key/value heads, D head_dim,
F MLP hidden, V padded vocab.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from tplr.train.config import ModelConfig
from tplr.train.model.loss import Reduction, head_cross_entropy

Checkpointing = Literal["none", "full", "selective"]

_SAVED_IN_SELECTIVE = {
    # the compute-heavy ops whose outputs selective checkpointing keeps (the rest: norms,
    # rotary, activations, residual adds, is recomputed in the backward pass)
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return (
        CheckpointPolicy.MUST_SAVE
        if op in _SAVED_IN_SELECTIVE
        else CheckpointPolicy.PREFER_RECOMPUTE
    )


_selective_contexts = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


def rotary_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, ...]:
    """cos/sin tables of shape (max_seq_len, head_dim // 2), float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim. x: (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    """One fused q/k/v projection: (H + 2K) x D outputs; K < H shares each key/value head
    among H / K query heads (grouped-query attention)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.qk_norm = config.qk_norm  # weightless RMSNorm of q and k over the head dim
        self.norm_eps = config.norm_eps

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((H * D, K * D, K * D), dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if self.qk_norm:
            q = F.rms_norm(q, (D,), eps=self.norm_eps)
            k = F.rms_norm(k, (D,), eps=self.norm_eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H or K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)  # one dtype for the flash kernel (no-op if equal)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # y: (B, H, T, D)


class MLP(nn.Module):
    """ReLU² or GELU (``fc``: C -> F), or SwiGLU (``fc``: C -> 2F, gate then up)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.activation = config.activation
        fc_out = 2 * hidden if self.activation == "swiglu" else hidden
        self.fc = nn.Linear(config.d_model, fc_out, bias=False)
        self.proj = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, F) or (B, T, 2F)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm transformer block. ``checkpointing`` (set by the worker): ``full`` keeps only
    the block's input and recomputes the rest in the backward pass; ``selective`` also keeps
    the matmul and attention outputs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.checkpointing: Checkpointing = "none"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self._layers(x, cos, sin)
        if self.checkpointing == "full":
            return checkpoint(self._layers, x, cos, sin, use_reentrant=False)
        return checkpoint(
            self._layers, x, cos, sin, use_reentrant=False, context_fn=_selective_contexts
        )

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """``forward(idx, targets)`` returns the mean cross-entropy; ``logits(idx)`` the logits.

    ``loss_chunk_tokens`` (set by the worker; None = one plain loss over full logits) makes
    the loss run in chunks of that many tokens (:mod:`tplr.train.model.loss`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.embed = nn.Embedding(vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, vocab, bias=False)
        self.loss_chunk_tokens: int | None = None
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def set_checkpointing(self, mode: Checkpointing) -> None:
        for block in self.blocks:
            block.checkpointing = mode  # type: ignore[union-attr]

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the rotary tables (after ``to_empty`` from the meta device)."""
        config = self.config
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_base)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init (see :func:`init_parameter_`), in parameter order from the default RNG."""
        for name, param in self.named_parameters():
            init_parameter_(name, param, self.config)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.final_norm(x)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden_states(idx), self.head_weight())  # (B, T, V)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "mean"
    ) -> torch.Tensor:
        """Cross-entropy over targets != -100 (mean, or sum with ``reduction="sum"``)."""
        hidden = self.hidden_states(idx).flatten(0, 1)  # (B*T, C)
        return head_cross_entropy(
            hidden,
            self.head_weight(),
            targets.flatten(),
            chunk_tokens=self.loss_chunk_tokens,
            reduction=reduction,
        )


@torch.no_grad()
def init_parameter_(
    name: str, param: torch.Tensor, config: ModelConfig, generator: torch.Generator | None = None
) -> None:
    """N(0, 0.02); residual projections N(0, 0.02/sqrt(2 x layers)); RMSNorm gains 1."""
    if param.ndim < 2:
        param.fill_(1.0)
    elif name.endswith("proj.weight"):
        param.normal_(0.0, 0.02 / math.sqrt(2 * config.n_layer), generator=generator)
    else:
        param.normal_(0.0, 0.02, generator=generator)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
