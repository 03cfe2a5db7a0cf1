"""Training throughput: our TrainWorker against a bare reference loop, side by side.

Both run the same model (same config and init), the same optimizer, clipping, precision and
compile setting, on the same pre-made batches. The bare loop is nothing else: no metrics,
no feed thread, no batch checks, no schedule, no loss accounting. Many short rounds
alternate the order (ours first, then bare first) so load on a shared, noisy machine hits
both alike; the headline is the median of the per-round paired ratios. On CPU a round is one
optimizer step, so ours also pays its per-call costs (feed thread start, final sync) every
step: a harsher test than the node's calls of many steps. On CUDA it also prints MFU.

    .venv/bin/python scripts/bench_train.py                 # CPU-sized model
    .venv/bin/python scripts/bench_train.py --model small   # GPT-2 small (use on a GPU)
    .venv/bin/python scripts/bench_train.py --distributed   # 1 process, DDP x2, FSDP2 x2

``--distributed`` runs three whole jobs, one after the other (torchrun with 2 gloo
processes on CPU, or NCCL on 2 GPUs), and prints one line per job with its ratio. Under
torchrun the bare loop is DDP (gradient all-reduce on the last micro-step only) or FSDP2
(``fully_shard`` per block then the root), with the same model, init and optimizer.

Bar: ours >= 0.95x the bare loop (our machinery costs <= 5%).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch.nn.parallel import DistributedDataParallel

from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.metrics import TrainMetrics
from tplr.train.model.flops import mfu
from tplr.train.optim import build_optimizers
from tplr.train.parallel.distributed import LaunchEnv, distributed_context
from tplr.train.parallel.sharding import build_model, fsdp_sharder
from tplr.train.worker import TrainWorker

CPU_BENCH_SHAPE = {"n_layer": 4, "n_head": 4, "d_model": 192, "max_seq_len": 128}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cpu-bench", help="preset or cpu-bench (default)")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument(
        "--accumulation", type=int, default=2, help="micro-steps per optimizer step, per rank"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument(
        "--prefetch-batches",
        type=int,
        default=None,
        help="our feed thread's depth (default: the worker's, 2 on CUDA, 0 on CPU)",
    )
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--parallel",
        default="auto",
        choices=["auto", "ddp", "fsdp"],
        help="under torchrun: the worker's strategy (the bare loop does the same)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="run one process, then DDP and FSDP2 with 2 processes each (torchrun), and "
        "print every job's ratio",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: on a shared box, OpenMP barriers make "
        "multi-threaded wall times swing 10x; the torch default on GPU)",
    )
    return parser.parse_args()


def build_configs(
    args: argparse.Namespace, on_cuda: bool, world_size: int = 1
) -> tuple[ModelConfig, TrainConfig]:
    if args.model == "cpu-bench":
        model_config = ModelConfig.preset(
            "tiny", vocab_size=args.vocab_size or 4096, **CPU_BENCH_SHAPE
        )
    else:
        model_config = ModelConfig.preset(args.model, vocab_size=args.vocab_size or 50257)
    seq_len = args.seq_len or model_config.max_seq_len
    micro = args.micro_batch_size or (16 if on_cuda else 8)
    train_config = TrainConfig(
        optimizer=args.optimizer,
        micro_batch_size=micro,
        global_batch_size=micro * args.accumulation * world_size,  # accumulation per rank
        seq_len=seq_len,
        device=args.device,
        compile=args.compile,
        prefetch_batches=args.prefetch_batches,
        warmup_steps=0,
        total_steps=1_000_000,
        parallel=args.parallel,
    )
    return model_config, train_config


class BareLoop:
    """The reference: forward, backward, clip, step. Nothing else (DDP's ``no_sync`` on
    all but the last micro-step, or FSDP2's sharding, when the worker uses them)."""

    def __init__(self, worker: TrainWorker) -> None:
        config = worker.config
        self.device = worker.device
        self.accum = worker.accumulation_steps
        self.parallel = worker.parallel
        shard = None
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (worker.context.world_size,))
            compile_block = (lambda b: b.compile()) if worker.compile_enabled else None
            shard = fsdp_sharder(
                mesh, compute_dtype=worker.autocast_dtype, compile_block=compile_block
            )
        self.model = build_model(worker.model_config, self.device, seed=config.seed, shard=shard)
        self.model.loss_chunk_tokens = worker.model.loss_chunk_tokens
        module = self.model
        if self.parallel == "ddp":
            module = self.ddp = DistributedDataParallel(
                self.model, broadcast_buffers=False, gradient_as_bucket_view=True,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )  # fmt: skip
        compile_whole = worker.compile_enabled and self.parallel != "fsdp"
        self.module = torch.compile(module) if compile_whole else module
        self.optimizers = build_optimizers(self.model, config, device=self.device)
        self.clip = config.grad_clip_norm
        self.dtype = worker.autocast_dtype

    def run(self, batches: list, steps: int) -> torch.Tensor:
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        index = 0
        for _ in range(steps):
            for micro in range(self.accum):
                inputs, targets = batches[index % len(batches)]
                index += 1
                inputs = inputs.to(self.device, non_blocking=True).long()
                targets = targets.to(self.device, non_blocking=True).long()
                last = micro == self.accum - 1
                sync = self.ddp.no_sync() if self.parallel == "ddp" and not last else None
                with sync or contextlib.nullcontext(), autocast:
                    loss = self.module(inputs, targets)
                    (loss / self.accum).backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def timed(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds, all threads) of one run (all ranks together)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run()
    if isinstance(result, torch.Tensor):
        result.item()  # sync point: wait for the last step to finish
    if dist.is_initialized():
        dist.barrier()  # the round ends when the slowest rank is done
    return time.perf_counter() - started, time.process_time() - cpu_started


def make_batches(model_config: ModelConfig, config: TrainConfig, count: int, pin: bool) -> list:
    generator = torch.Generator().manual_seed(0)
    shape = (config.micro_batch_size, config.seq_len + 1)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, model_config.vocab_size, shape, generator=generator)
        tokens = tokens.to(torch.int32)  # host format, upcast on the device by both loops
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        batches.append((inputs, targets))
    return batches


def main() -> None:
    args = parse_args()
    if args.distributed:
        run_all_jobs()
        return
    env = LaunchEnv.from_environ(os.environ)
    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.threads or not on_cuda:
        torch.set_num_threads(args.threads or 1)
    with distributed_context(env, device=args.device) as context:
        bench(args, context, on_cuda)


def bench(args: argparse.Namespace, context, on_cuda: bool) -> None:
    model_config, config = build_configs(args, on_cuda, context.world_size)
    worker = TrainWorker(
        model_config, config, context=context, metrics=TrainMetrics(CollectorRegistry())
    )
    bare = BareLoop(worker)
    steps = args.steps or (20 if on_cuda else 1)
    batches = make_batches(model_config, config, steps * worker.accumulation_steps, on_cuda)
    tokens_per_round = steps * config.global_batch_size * config.seq_len

    def ours() -> None:
        worker.train_steps(iter(batches), steps)

    def reference() -> torch.Tensor:
        return bare.run(batches, steps)

    say = print if context.is_main else (lambda *a, **k: None)
    say(
        f"device {worker.device} | {worker.parallel} x{context.world_size} | model {args.model} "
        f"({model_config.d_model}d x {model_config.n_layer}L, vocab "
        f"{model_config.padded_vocab_size}) | seq {config.seq_len} | micro "
        f"{config.micro_batch_size} x accum {worker.accumulation_steps} | {config.optimizer} | "
        f"compile {worker.compile_enabled} | {steps} steps x {args.rounds} rounds | threads "
        f"{torch.get_num_threads()} | feed depth {worker.prefetch_depth}"
    )
    timed(ours, worker.device)  # warm-up: compile, allocator, kernel selection
    timed(reference, worker.device)
    rounds, cpu_rounds = [], []
    for round_index in range(args.rounds):
        order = [("ours", ours), ("bare", reference)]
        seconds, cpu_seconds = {}, {}
        for name, run in order if round_index % 2 == 0 else reversed(order):
            seconds[name], cpu_seconds[name] = timed(run, worker.device)
        rounds.append(seconds)
        cpu_rounds.append(cpu_seconds)
        if args.verbose:
            say(
                f"  round {round_index:2d}: ours {tokens_per_round / seconds['ours']:10,.0f} tok/s"
                f" | bare {tokens_per_round / seconds['bare']:10,.0f} tok/s"
                f" | ratio {seconds['bare'] / seconds['ours']:.3f}"
            )
    if context.is_main:
        report(rounds, tokens_per_round, worker)
        cpu_ratio = sum(r["bare"] for r in cpu_rounds) / sum(r["ours"] for r in cpu_rounds)
        print(f"CPU-time ratio bare/ours (contention-robust cross-check): {cpu_ratio:.3f}")


def run_all_jobs() -> None:
    """One process, then DDP and FSDP2 with 2 processes each; one summary line per job."""
    passthrough = [a for a in sys.argv[1:] if a != "--distributed"]
    script = str(Path(__file__).resolve())
    jobs = {
        "1 process": [sys.executable, script, *passthrough],
        "DDP x2": _torchrun(script, passthrough, "ddp"),
        "FSDP2 x2": _torchrun(script, passthrough, "fsdp"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    summary = []
    for name, command in jobs.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        print(f"== {name}\n{done.stdout.strip()}", flush=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        ratio = next(line for line in done.stdout.splitlines() if line.startswith("ratio"))
        summary.append(f"{name:10s} {ratio}")
    print("\n".join(["== summary (bar: ours >= 0.95x bare)", *summary]))


def _torchrun(script: str, passthrough: list[str], parallel: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        script, *passthrough, "--parallel", parallel,
    ]  # fmt: skip


def report(rounds: list[dict[str, float]], tokens_per_round: int, worker: TrainWorker) -> None:
    """Median of per-round paired ratios (robust to bursts of load that hit one round)."""
    for name in ("ours", "bare"):
        rate = statistics.median(tokens_per_round / r[name] for r in rounds)
        util = mfu(rate, worker.flops_per_token, worker.peak_flops)
        extra = "" if util is None else f" | MFU {util:.1%}"
        print(f"{name}: {rate:12,.0f} tokens/s (median round){extra}")
    ratio = statistics.median(r["bare"] / r["ours"] for r in rounds)
    total = sum(r["bare"] for r in rounds) / sum(r["ours"] for r in rounds)
    verdict = "PASS" if ratio >= 0.95 else "FAIL"
    print(f"ratio ours/bare: {ratio:.3f} median of paired rounds, {total:.3f} over all rounds")
    print(f"{verdict}: bar is ours >= 0.95x bare")


if __name__ == "__main__":
    main()
