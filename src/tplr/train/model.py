"""A GPT in plain PyTorch: rotary embeddings, RMSNorm with QK-norm, ReLU²/GELU MLP,
tied or untied head, vocabulary padded to a multiple of 128, and
``scaled_dot_product_attention(is_causal=True)`` (flash kernels on H100).

Shapes in comments: B batch, T sequence, C d_model, H heads, D head_dim, V padded vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tplr.train.config import ModelConfig


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
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.qk_norm = config.qk_norm  # weightless RMSNorm of q and k over the head dim
        self.norm_eps = config.norm_eps

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(dim=2)  # each (B, T, H, D)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,), eps=self.norm_eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.norm_eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)  # one dtype for the flash kernel (no-op if equal)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, config.d_model, bias=False)
        self.relu2 = config.activation == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, ratio * C)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """``forward(idx, targets)`` returns the mean cross-entropy; ``logits(idx)`` the logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.embed = nn.Embedding(vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, vocab, bias=False)
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 x layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if param.ndim < 2:
                param.fill_(1.0)  # RMSNorm gains
            elif name.endswith("proj.weight"):
                param.normal_(0.0, residual_std)
            else:
                param.normal_(0.0, 0.02)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.final_norm(x)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.hidden_states(idx)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
