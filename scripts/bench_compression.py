"""Compression speed: our vectorised chunked top-k against two common alternatives.

All three compress the same pseudo-gradients of a real GPT's parameter shapes with error
feedback (``e ← β·e + Δ``, send, ``e ← e − sent``) at the same budget (``k`` values per
``chunk`` entries) and bf16 values:

- ours: :class:`tplr.train.compression.ErrorFeedbackCompressor` (one topk per tensor);
- loop: the same chunked top-k written as a Python loop over chunks;
- global: one ``topk`` over each whole flattened tensor with the same total budget
  (``n_chunks·k``), int64 positions (what chunking avoids).

Rounds alternate the order so drift on a shared, noisy machine cancels; the ratios of
summed times are what matters. It also checks that loop and ours select the same entries,
and prints the payload size against dense bf16.

    .venv/bin/python scripts/bench_compression.py                    # GPT "tiny"-ish, CPU
    .venv/bin/python scripts/bench_compression.py --model small      # GPT-2 small (124M)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from tplr.protocol.payload import PayloadMeta, encode_payload
from tplr.train.compression import (
    CompressionSettings,
    ErrorFeedbackCompressor,
    decompress_all,
)
from tplr.train.config import ModelConfig
from tplr.train.model.gpt import GPT

BENCH_SHAPE = {"n_layer": 4, "n_head": 4, "d_model": 256, "max_seq_len": 256}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench", help="preset (tiny, small, ...) or bench")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow Python loop")
    return parser.parse_args()


def parameter_shapes(model: str) -> dict[str, torch.Size]:
    if model == "bench":
        config = ModelConfig.preset("tiny", vocab_size=8192, **BENCH_SHAPE)
    else:
        config = ModelConfig.preset(model, vocab_size=50257)
    with torch.device("meta"):
        gpt = GPT(config)
    return {name: param.shape for name, param in gpt.named_parameters()}


class LoopCompressor:
    """Chunked top-k with error feedback, one chunk at a time (the competitor)."""

    def __init__(self, settings: CompressionSettings) -> None:
        self.settings = settings
        self.errors: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def compress(self, deltas: dict[str, torch.Tensor]) -> dict[str, list]:
        chunk, k, beta = (
            self.settings.chunk_size,
            self.settings.topk,
            self.settings.error_feedback_beta,
        )
        sent: dict[str, list] = {}
        for name, delta in deltas.items():
            error = self.errors.setdefault(name, torch.zeros(delta.numel(), device=delta.device))
            error.mul_(beta).add_(delta.reshape(-1))
            parts = []
            for start in range(0, error.numel(), chunk):
                piece = error[start : start + chunk]
                index = piece.abs().topk(min(k, piece.numel())).indices
                values = piece[index].to(self.settings.value_dtype)
                piece[index] -= values.float()
                parts.append((index.to(self.settings.index_dtype), values))
            sent[name] = parts
        return sent


class GlobalTopKCompressor:
    """One top-k over each whole tensor with the same total budget (int64 positions)."""

    def __init__(self, settings: CompressionSettings) -> None:
        self.settings = settings
        self.errors: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def compress(self, deltas: dict[str, torch.Tensor]) -> dict[str, tuple]:
        sent: dict[str, tuple] = {}
        for name, delta in deltas.items():
            error = self.errors.setdefault(name, torch.zeros(delta.numel(), device=delta.device))
            error.mul_(self.settings.error_feedback_beta).add_(delta.reshape(-1))
            budget = self.settings.chunk_count(delta.numel()) * self.settings.topk
            index = error.abs().topk(min(budget, error.numel()), sorted=False).indices
            values = error[index].to(self.settings.value_dtype)
            error[index] -= values.float()
            sent[name] = (index, values)
        return sent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def check_same_selection(settings: CompressionSettings, deltas: dict) -> None:
    """Ours and the loop pick the same entries in every full chunk (first 50 per tensor)."""
    ours = ErrorFeedbackCompressor(settings).compress(deltas)
    loop = LoopCompressor(settings).compress(deltas)
    for name, part in ours.items():
        full_chunks = deltas[name].numel() // settings.chunk_size
        for row in range(min(full_chunks, 50)):
            mine = set(part.indices[row].to(torch.int64).tolist())
            theirs = set(loop[name][row][0].to(torch.int64).tolist())
            if mine != theirs:
                raise SystemExit(f"selection differs: {name} chunk {row}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = CompressionSettings(chunk_size=args.chunk_size, topk=args.topk)
    shapes = parameter_shapes(args.model)
    params = sum(math.prod(shape) for shape in shapes.values())
    generator = torch.Generator(device=device).manual_seed(0)
    deltas = {
        name: torch.randn(shape, generator=generator, device=device) * 1e-3
        for name, shape in shapes.items()
    }
    print(
        f"model {args.model}: {params / 1e6:.1f}M parameters in {len(shapes)} tensors; "
        f"chunk {settings.chunk_size}, k {settings.topk}; device {device}; "
        f"threads {torch.get_num_threads()}"
    )
    check_same_selection(settings, deltas)
    contenders: dict[str, object] = {
        "ours": ErrorFeedbackCompressor(settings),
        "global": GlobalTopKCompressor(settings),
    }
    if not args.skip_loop:
        contenders["loop"] = LoopCompressor(settings)
    for compressor in contenders.values():  # warm-up: allocate error buffers
        compressor.compress(deltas)
    totals = dict.fromkeys(contenders, 0.0)
    names = list(contenders)
    for round_number in range(args.rounds):
        order = names if round_number % 2 == 0 else list(reversed(names))
        for name in order:
            totals[name] += timed(lambda c=contenders[name]: c.compress(deltas), device)
    per_round = {name: total / args.rounds for name, total in totals.items()}
    for name, seconds in per_round.items():
        print(
            f"  {name:>6}: {seconds * 1000:9.1f} ms per window "
            f"({params / seconds / 1e6:8.1f} M params/s)"
        )
    for name in names[1:]:
        print(f"ratio {name}/ours: {totals[name] / totals['ours']:.2f}x (ours is that much faster)")

    sent = contenders["ours"].compress(deltas)
    decompress_s = timed(lambda: decompress_all(sent, settings.chunk_size, device=device), device)
    meta = PayloadMeta(run_id="bench", window=0, uid=0, sample_digest="-", sample_count=0)
    payload_bytes = len(encode_payload(meta, sent))
    dense_bf16_bytes = params * 2
    print(
        f"decompress: {decompress_s * 1000:.1f} ms; payload {payload_bytes / 2**20:.2f} MiB vs "
        f"dense bf16 {dense_bf16_bytes / 2**20:.1f} MiB "
        f"({dense_bf16_bytes / payload_bytes:.0f}x smaller)"
    )


if __name__ == "__main__":
    main()
