#!/usr/bin/env python
"""Batch loader benchmark: the tutorial per-sample loop vs tplr's vectorised loader.

On one llm.c shard (generated under /tmp if missing; >= 1e8 tokens by default), with
a warm page cache, in one process, alternating rounds of:

- tutorial: per sample, ``np.array`` copy of a memmap slice, ``astype(int32)``,
  ``torch.from_numpy``, row assignment into freshly zeroed int64 (B, T) tensors
  (the loader operators copy today, run as written, on CPU);
- ours int64: :class:`tplr.data.loader.BatchLoader` yielding fresh int64 (B, T)
  inputs and targets on the CPU, ready for the model;
- ours host: the same loader's host format, (B, T + 1) uint16 rows in a reused buffer
  (pinned on CUDA hosts), which the worker copies to the GPU and upcasts there.

Each of ours runs twice: with a background loader thread (``--workers``), and with
``workers=0`` (each batch assembled in the caller's thread when asked for). The host
format also runs with the per-batch token-range check off, to price that check (one max
per batch against the vocabulary), printed as a ratio. The tutorial
runs as written (torch's default intra-op threads) and with torch at one thread.

Prints tokens/s (B * T per batch) of each, per-round ratios and their medians, and
this machine's memcpy bandwidth measured in the same run.

    .venv/bin/python scripts/bench_loader.py            # defaults: 1e8 tokens, B=64, T=1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tplr.data.dataset import SharedShardedDataset
from tplr.data.formats import TokenFormat
from tplr.data.loader import BatchLoader, LoaderConfig
from tplr.data.sampler import window_sample_indices
from tplr.data.tools.writers import TokenShardWriter

GPT2_VOCAB = 50257


def make_shard(path: Path, num_tokens: int) -> None:
    """Write an llm.c GPT-2 shard of random tokens (atomic; skipped if present)."""
    if path.exists():
        return
    rng = np.random.default_rng(0)
    chunk = 1 << 24
    with TokenShardWriter(path, TokenFormat.LLMC, np.dtype("<u2")) as writer:
        for start in range(0, num_tokens, chunk):
            count = min(chunk, num_tokens - start)
            writer.append(rng.integers(0, GPT2_VOCAB, count, dtype=np.uint16))
        writer.finish()


class TutorialDataset:
    """The loader operators copy today (see shared/seeds), reduced to one shard on CPU."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.block_size = block_size
        self.data = [np.memmap(path, dtype=np.uint16, mode="r")]  # header read as tokens
        self.lengths = [len(d) for d in self.data]
        self.total_length = sum(self.lengths)

    def _get_tokens(self, global_idx: int, length: int) -> np.ndarray:
        cumsum = 0
        for i, shard_len in enumerate(self.lengths):
            if global_idx < cumsum + shard_len:
                local_idx = global_idx - cumsum
                return np.array(self.data[i][local_idx : local_idx + length])
            cumsum += shard_len
        raise IndexError("Index out of range")

    def get_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        max_start = self.total_length - self.block_size - 1
        starts = torch.randint(0, max_start, (batch_size,))
        x = torch.zeros(batch_size, self.block_size, dtype=torch.long)
        y = torch.zeros(batch_size, self.block_size, dtype=torch.long)
        for i, start in enumerate(starts):
            tokens = self._get_tokens(start.item(), self.block_size + 1)
            x[i] = torch.from_numpy(tokens[:-1].astype(np.int32))
            y[i] = torch.from_numpy(tokens[1:].astype(np.int32))
        return x, y


def memcpy_gbps(num_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-N large copy bandwidth (bytes copied per second, read + write once each)."""
    src = np.ones(num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def timed(fn: Callable[[], int]) -> float:
    """Tokens per second of ``fn`` (which returns the number of tokens it produced)."""
    start = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - start)


def run_tutorial(
    tutorial: TutorialDataset, batches: int, batch_size: int, threads: int | None
) -> int:
    """The tutorial loop; ``threads`` (None: torch's default) intra-op threads while it runs."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        for _ in range(batches):
            x, _y = tutorial.get_batch(batch_size)
    finally:
        torch.set_num_threads(default)
    return batches * x.numel()


def run_loader(ds: SharedShardedDataset, indices: np.ndarray, config: LoaderConfig) -> int:
    produced = 0
    with BatchLoader(ds, indices, config=config) as loader:
        for batch in loader:
            produced += batch[0].numel()  # (B, T) inputs: int64, or a view of the host rows
    return produced


LABELS = {
    "tutorial": "tutorial loop (torch default threads)",
    "tutorial_1t": "tutorial loop (torch 1 thread)",
    "int64": "ours int64, loader thread",
    "host": "ours host format, loader thread",
    "int64_inline": "ours int64, workers=0",
    "host_inline": "ours host format, workers=0",
    "host_inline_nocheck": "ours host, workers=0, no range check",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=Path("/tmp/tplr-bench/llmc_100M.bin"))
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tutorial-batches", type=int, default=20)
    parser.add_argument("--ours-batches", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="loader background threads")
    parser.add_argument("--prefetch", type=int, default=4)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    B, T = args.batch_size, args.seq_len
    make_shard(args.path, args.tokens)
    ds = SharedShardedDataset.open(args.path, seq_len=T, shard_index=0, vocab_size=GPT2_VOCAB)
    int(np.asarray(ds.shard.tokens).max())  # warm the page cache and the mapping
    tutorial = TutorialDataset(args.path, T)
    configs = {
        f"{output}{suffix}": LoaderConfig(
            batch_size=B, prefetch_batches=args.prefetch, workers=workers, output=output
        )
        for output in ("int64", "host")
        for suffix, workers in (("", args.workers), ("_inline", 0))
    }
    configs["host_inline_nocheck"] = configs["host_inline"].model_copy(
        update={"token_range_check": False}
    )
    print(f"shard {args.path}: {ds.shard.tokens.shape[0]:,} tokens, {len(ds):,} rows of {T + 1}")
    print(
        f"B={B} T={T}, torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
        f"loader workers={args.workers} prefetch={args.prefetch}, rounds={args.rounds}"
    )
    results: dict[str, list[float]] = {key: [] for key in LABELS}
    for round_no in range(args.rounds):
        idx = window_sample_indices(
            run_seed=7,
            uid=round_no,
            window=0,
            shard_index=0,
            num_samples=len(ds),
            count=args.ours_batches * B,
        )
        contenders: dict[str, Callable[[], int]] = {
            "tutorial": lambda: run_tutorial(tutorial, args.tutorial_batches, B, threads=None),
            "tutorial_1t": lambda: run_tutorial(tutorial, args.tutorial_batches, B, threads=1),
        }
        for key, cfg in configs.items():
            contenders[key] = lambda idx=idx, cfg=cfg: run_loader(ds, idx, cfg)
        for key, fn in contenders.items():
            results[key].append(timed(fn))
    report(results, memcpy_gbps(), T)


def _median_ratio(ours: list[float], base: list[float]) -> float:
    return statistics.median(o / b for o, b in zip(ours, base, strict=True))


def report(results: dict[str, list[float]], gbps: float, T: int) -> None:
    base, base_1t = results["tutorial"], results["tutorial_1t"]
    print(f"\n{'path':<40}{'median tok/s':>14}{'vs tutorial':>13}{'vs tutorial 1t':>16}")
    for key, label in LABELS.items():
        print(
            f"{label:<40}{statistics.median(results[key]) / 1e6:>10.1f} M/s"
            f"{_median_ratio(results[key], base):>12.1f}x"
            f"{_median_ratio(results[key], base_1t):>15.1f}x"
        )
    bytes_per_token = 2 * (T + 1) / T
    print(
        f"\nmemcpy bandwidth (this run): {gbps:.2f} GB/s. The host format copies "
        f"{bytes_per_token:.2f} B/token, so memcpy alone caps it near "
        f"{gbps * 1e9 / bytes_per_token / 1e6:,.0f} M tok/s."
    )
    check_cost = _median_ratio(results["host_inline"], results["host_inline_nocheck"])
    print(
        "per-batch token-range check (one max per batch): the host format with it runs at "
        f"{check_cost:.2f}x its speed without it"
    )
    for base_key, name in (("tutorial", "as written"), ("tutorial_1t", "at 1 torch thread")):
        verdicts = []
        for key, bar in (("int64", 15), ("host", 40), ("int64_inline", 15), ("host_inline", 40)):
            ratio = _median_ratio(results[key], results[base_key])
            verdicts.append(f"{key} {ratio:.1f}x {'PASS' if ratio >= bar else 'FAIL'}")
        print(f"bars (int64 >= 15x, host >= 40x) vs the tutorial {name}: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
