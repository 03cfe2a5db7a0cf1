"""Synthetic token batches for smoke runs, tests and benchmarks (no dataset needed).

``progression_batches`` yields learnable sequences: ``x[t] = (start + stride * t) mod vocab``
with a random start and a stride drawn from a few values, so a model that reads the context
can predict every token after the second one and the loss falls towards zero.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def progression_batches(
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    strides: tuple[int, ...] = (1, 2, 3),
    dtype: torch.dtype = torch.int64,
) -> Iterator[Batch]:
    """Endless ``(inputs, targets)`` pairs of shape (batch_size, seq_len) on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    stride_table = torch.tensor(strides)
    positions = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, vocab_size, (batch_size, 1), generator=generator)
        picks = torch.randint(0, len(strides), (batch_size, 1), generator=generator)
        tokens = (starts + stride_table[picks] * positions) % vocab_size  # (B, T + 1)
        tokens = tokens.to(dtype)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def random_batches(
    vocab_size: int, batch_size: int, seq_len: int, *, seed: int = 0, count: int | None = None
) -> Iterator[Batch]:
    """Uniformly random tokens (unlearnable; for throughput measurements)."""
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while count is None or produced < count:
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        produced += 1
