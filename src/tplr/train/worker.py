"""The training worker: model + optimizers + schedule on one device, DDP under torchrun.

The node drives it with ``train_steps(batches, n)``; every call runs ``n`` optimizer steps of
``global_batch_size`` sequences each (``micro_batch_size`` x world size x accumulation steps).
Calls are synchronous and compute-bound: the node runs them off the event loop
(``asyncio.to_thread``). With DDP, every rank must make the same calls in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tplr.train import checkpoint as ckpt
from tplr.train import params as param_ops
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.distributed import DistContext, resolve_device
from tplr.train.errors import BatchError, CheckpointError, TrainConfigError, TrainingDivergedError
from tplr.train.feed import Batch, BatchFeed, BatchSpec, check_batch, to_device
from tplr.train.flops import flops_per_token, mfu, peak_flops_for
from tplr.train.metrics import TrainMetrics
from tplr.train.model import GPT
from tplr.train.optim import (
    WarmupCosineSchedule,
    build_optimizers,
    optimizer_names,
    refresh_hyperparameters,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainStats:
    """Outcome of one ``train_steps`` call. Token counts are per process unless ``global_``."""

    steps: int
    step: int  # the worker's optimizer step after the call
    loss: float  # mean over the call's micro-batches (all ranks)
    grad_norm: float | None  # mean pre-clip gradient norm (None without clipping)
    lr_factor: float  # schedule factor of the last step
    tokens: int
    global_tokens: int
    seconds: float
    tokens_per_s: float
    global_tokens_per_s: float
    mfu: float | None  # of this device; None off CUDA or on an unknown GPU


class TrainWorker:
    """See the module docstring. ``context`` defaults to a single process on ``config.device``."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainConfig,
        *,
        context: DistContext | None = None,
        metrics: TrainMetrics | None = None,
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.context = context or DistContext(0, 1, 0, resolve_device(config.device))
        self.device = self.context.device
        self.metrics = metrics
        if config.seq_len > model_config.max_seq_len:
            raise TrainConfigError(
                f"seq_len ({config.seq_len}) exceeds the model's max_seq_len "
                f"({model_config.max_seq_len})",
                hint="lower --seq-len or raise the model's max_seq_len",
            )
        self.accumulation_steps = config.accumulation_steps(self.context.world_size)
        self._setup_fast_path()
        torch.manual_seed(config.seed)
        with torch.device(self.device):
            self.model = GPT(model_config)  # unwrapped: names, state_dict, parameter ops
        self._ddp = self._wrap_ddp(self.model)
        self._train_module = self._maybe_compile(self._ddp or self.model)
        self._eval_module = self._maybe_compile(self.model)
        self._optimizers = build_optimizers(self.model, config, device=self.device)
        self._schedule = WarmupCosineSchedule.from_config(config)
        self.step = 0
        self.flops_per_token = flops_per_token(model_config, config.seq_len)
        self.peak_flops = self._peak_flops()

    # -- setup -------------------------------------------------------------------------
    def _setup_fast_path(self) -> None:
        on_cuda = self.device.type == "cuda"
        wanted = self.config.dtype
        self.autocast_dtype = (
            torch.bfloat16 if wanted == "bfloat16" or (wanted == "auto" and on_cuda) else None
        )
        self.compile_enabled = on_cuda if self.config.compile is None else self.config.compile
        # A feed thread overlaps host work with GPU compute. On CPU the compute already uses
        # the cores, so the thread buys nothing and each hand-off costs a wake-up.
        wanted_depth = self.config.prefetch_batches
        self.prefetch_depth = (2 if on_cuda else 0) if wanted_depth is None else wanted_depth
        if on_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
            torch.backends.cudnn.allow_tf32 = True

    def _wrap_ddp(self, model: nn.Module) -> DistributedDataParallel | None:
        if not self.context.distributed:
            return None
        on_cuda = self.device.type == "cuda"
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if on_cuda else None,
            broadcast_buffers=False,  # rotary tables are identical constants on every rank
            gradient_as_bucket_view=True,
        )

    def _maybe_compile(self, module: nn.Module) -> nn.Module:
        if not self.compile_enabled:
            return module
        return torch.compile(module, backend=self.config.compile_backend)  # type: ignore[return-value]

    def _peak_flops(self) -> float | None:
        if self.config.peak_tflops is not None:
            return self.config.peak_tflops * 1e12
        if self.device.type != "cuda":
            return None
        return peak_flops_for(torch.cuda.get_device_name(self.device))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _grad_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only on the last micro-step of an optimizer step."""
        if self._ddp is None or last_micro_step:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    # -- training ----------------------------------------------------------------------
    def _train_spec(self) -> BatchSpec:
        return BatchSpec(
            vocab_size=self.model_config.vocab_size,
            max_seq_len=self.model_config.max_seq_len,
            batch_size=self.config.micro_batch_size,
            seq_len=self.config.seq_len,
            check_token_ids=self.config.validate_batches,
        )

    def train_steps(self, batches: Iterable[Batch], n: int) -> TrainStats:
        """Run ``n`` optimizer steps on ``n x accumulation_steps`` micro-batches of ``batches``."""
        if n < 1:
            raise TrainConfigError(f"train_steps needs n >= 1 optimizer steps, got {n}")
        self.model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)  # stays on device: no per-step sync
        norm_sum = torch.zeros((), device=self.device)
        log_state = _LogState(started, self.step, 0.0)
        count = n * self.accumulation_steps
        with BatchFeed(
            iter(batches),
            count,
            spec=self._train_spec(),
            device=self.device,
            depth=self.prefetch_depth,
        ) as feed:
            for _ in range(n):
                lr_factor = self._optimizer_step(feed, loss_sum, norm_sum)
                if self._should_log():
                    self._log_progress(log_state, loss_sum, lr_factor)
        return self._finish_call(started, n, loss_sum, norm_sum, lr_factor)

    def _optimizer_step(self, feed: BatchFeed, loss_sum: torch.Tensor, norm_sum: torch.Tensor):
        lr_factor = self._schedule.apply(self._optimizers, self.step)
        accum = self.accumulation_steps
        for micro_step in range(accum):
            inputs, targets = feed.next_batch()  # (B, T) int64 on the device
            with self._grad_sync(last_micro_step=micro_step == accum - 1):
                with self._autocast():
                    loss = self._train_module(inputs, targets)  # scalar, fp32
                (loss / accum).backward()
            loss_sum += loss.detach()
        if self.config.grad_clip_norm is not None:
            norm_sum += nn.utils.clip_grad_norm_(
                self.model.parameters(), self.config.grad_clip_norm, foreach=True
            )
        for optimizer in self._optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr_factor

    def _should_log(self) -> bool:
        every = self.config.log_every_steps
        return every > 0 and self.step % every == 0 and self.context.is_main

    def _log_progress(self, state: _LogState, loss_sum: torch.Tensor, lr_factor: float) -> None:
        total = loss_sum.item()  # sync point: only at log steps
        now = time.perf_counter()
        steps = self.step - state.step
        micro = steps * self.accumulation_steps
        tokens = micro * self.config.micro_batch_size * self.config.seq_len
        rate = tokens / max(now - state.time_s, 1e-9)
        util = mfu(rate, self.flops_per_token, self.peak_flops)
        log.info(
            "step %d | loss %.4f | %s tok/s | MFU %s | lr x%.3f",
            self.step,
            (total - state.loss_sum) / micro,
            f"{rate:,.0f}",
            "n/a" if util is None else f"{util:.1%}",
            lr_factor,
        )
        state.time_s, state.step, state.loss_sum = now, self.step, total

    def _finish_call(
        self, started: float, n: int, loss_sum: torch.Tensor, norm_sum: torch.Tensor, lr: float
    ) -> TrainStats:
        totals = torch.stack([loss_sum, norm_sum])
        if self.context.distributed:
            dist.all_reduce(totals)
            totals /= self.context.world_size
        loss_total, norm_total = totals.tolist()  # sync point: once per call
        seconds = time.perf_counter() - started
        loss = loss_total / (n * self.accumulation_steps)
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"training loss is {loss} at step {self.step}")
        tokens = n * self.accumulation_steps * self.config.micro_batch_size * self.config.seq_len
        stats = TrainStats(
            steps=n,
            step=self.step,
            loss=loss,
            grad_norm=None if self.config.grad_clip_norm is None else norm_total / n,
            lr_factor=lr,
            tokens=tokens,
            global_tokens=tokens * self.context.world_size,
            seconds=seconds,
            tokens_per_s=tokens / seconds,
            global_tokens_per_s=tokens * self.context.world_size / seconds,
            mfu=mfu(tokens / seconds, self.flops_per_token, self.peak_flops),
        )
        self._record(stats)
        return stats

    def _record(self, stats: TrainStats) -> None:
        if self.metrics is None:
            return
        self.metrics.optimizer_steps.inc(stats.steps)
        self.metrics.tokens.inc(stats.tokens)
        self.metrics.loss.set(stats.loss)
        self.metrics.tokens_per_second.set(stats.tokens_per_s)
        self.metrics.call_duration.observe(stats.seconds)
        if stats.mfu is not None:
            self.metrics.mfu.set(stats.mfu)

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Token-weighted mean loss over ``batches`` (all ranks together under DDP)."""
        self.model.eval()
        spec = BatchSpec(
            vocab_size=self.model_config.vocab_size,
            max_seq_len=self.model_config.max_seq_len,
            check_token_ids=self.config.validate_batches,
        )
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        token_count = 0
        for index, raw in enumerate(batches):
            inputs, targets = check_batch(raw, spec, index)
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            with self._autocast():
                loss = self._eval_module(inputs, targets)
            loss_sum += loss.double() * targets.numel()
            token_count += targets.numel()
        totals = torch.stack(
            [loss_sum, torch.tensor(float(token_count), device=self.device, dtype=torch.float64)]
        )
        if self.context.distributed:
            dist.all_reduce(totals)
        loss_total, tokens = totals.tolist()  # sync point
        if tokens == 0:
            raise BatchError("evaluate got no batches", hint="pass at least one validation batch")
        mean = loss_total / tokens
        if self.metrics is not None:
            self.metrics.eval_loss.set(mean)
        return mean

    @torch.no_grad()
    def sample_losses(self, batches: Iterable[Batch]) -> torch.Tensor:
        """Mean token loss per row over ``batches``, as one float32 CPU tensor ``(rows,)``.

        Single process only (validators): the scoring gate compares rows one by one."""
        self.model.eval()
        spec = BatchSpec(
            vocab_size=self.model_config.vocab_size,
            max_seq_len=self.model_config.max_seq_len,
            check_token_ids=self.config.validate_batches,
        )
        per_row = []
        for index, raw in enumerate(batches):
            inputs, targets = check_batch(raw, spec, index)
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            with self._autocast():
                logits = self.model.logits(inputs)  # (B, T, V)
            losses = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
            )
            per_row.append(losses.view(targets.shape).mean(dim=1))  # (B,)
        if not per_row:
            raise BatchError("sample_losses got no batches", hint="pass at least one batch")
        return torch.cat(per_row).float().cpu()  # sync point

    def loss_gradient(self, batches: Iterable[Batch]) -> tuple[float, param_ops.ParameterDict]:
        """``(mean loss, ∇ mean loss)`` over ``batches`` at the current parameters, each
        batch weighted by its tokens; leaves no gradient behind (single process only)."""
        self.model.eval()
        spec = BatchSpec(
            vocab_size=self.model_config.vocab_size,
            max_seq_len=self.model_config.max_seq_len,
            check_token_ids=self.config.validate_batches,
        )
        materialised = [check_batch(raw, spec, index) for index, raw in enumerate(batches)]
        if not materialised:
            raise BatchError("loss_gradient got no batches", hint="pass at least one batch")
        total_tokens = sum(targets.numel() for _, targets in materialised)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.model.zero_grad(set_to_none=True)
        try:
            for inputs, targets in materialised:
                inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
                with self._autocast():
                    loss = self.model(inputs, targets)  # scalar, fp32
                share = targets.numel() / total_tokens
                (loss * share).backward()
                loss_sum += loss.detach().double() * share
            gradient = {
                name: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                for name, p in self.model.named_parameters()
            }
        finally:
            self.model.zero_grad(set_to_none=True)
        return float(loss_sum), gradient  # sync point

    # -- parameters --------------------------------------------------------------------
    def snapshot(self) -> param_ops.ParameterDict:
        """Parameters copied to CPU (pinned memory on GPU); restore with :meth:`restore`."""
        return param_ops.snapshot_parameters(self.model, self.device)

    def restore(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        param_ops.restore_parameters(self.model, snapshot)

    def pseudo_gradient(self, snapshot: Mapping[str, torch.Tensor]) -> param_ops.ParameterDict:
        """``Δ = θ_snapshot − θ_now``: what this worker's steps since the snapshot did."""
        return param_ops.pseudo_gradient(self.model, snapshot)

    def apply_update(self, delta: Mapping[str, torch.Tensor], lr: float) -> None:
        """Outer step ``θ ← θ − lr · Δ`` (same on every rank: pass the same Δ everywhere)."""
        param_ops.apply_update(self.model, delta, lr)

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> None:
        """Rank 0 writes the full state atomically; every rank must call (it ends in a barrier)."""
        if self.context.is_main:
            started = time.perf_counter()
            ckpt.write_checkpoint_atomic(self._checkpoint_state(), Path(path))
            if self.metrics is not None:
                self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
            log.info("saved checkpoint %s at step %d", path, self.step)
        if self.context.distributed:
            dist.barrier()

    def _checkpoint_state(self) -> dict:
        names = optimizer_names(self._optimizers)
        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            "version": ckpt.CHECKPOINT_VERSION,
            "step": self.step,
            "world_size": self.context.world_size,
            "model_config": self.model_config.model_dump(),
            "train_config": self.config.model_dump(),
            "model": self.model.state_dict(),
            "optimizers": {
                name: opt.state_dict() for name, opt in zip(names, self._optimizers, strict=True)
            },
            "scheduler": {**self._schedule.state_dict(), "step": self.step},
            "rng": ckpt.capture_rng_state(self.device),
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizers, step and RNG (any world size; every rank reads the file)."""
        state = ckpt.read_checkpoint(Path(path))
        self._check_model_config(state["model_config"], path)
        saved = state["optimizers"]
        names = optimizer_names(self._optimizers)
        if sorted(saved) != sorted(names):
            raise CheckpointError(
                f"checkpoint {path} was trained with optimizers {sorted(saved)}, this run "
                f"uses {sorted(names)}",
                hint="resume with the same --optimizer",
            )
        try:
            self.model.load_state_dict(state["model"])
            for name, optimizer in zip(names, self._optimizers, strict=True):
                optimizer.load_state_dict(saved[name])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc
        refresh_hyperparameters(self._optimizers, self.config)
        self.step = int(state["step"])
        ckpt.restore_rng_state(state["rng"], self.device)
        log.info("loaded checkpoint %s at step %d", path, self.step)

    def _check_model_config(self, saved: dict, path: str | Path) -> None:
        current = self.model_config.model_dump()
        differing = sorted(k for k in current if saved.get(k) != current[k])
        if differing:
            detail = ", ".join(f"{k}: {saved.get(k)!r} != {current[k]!r}" for k in differing)
            raise CheckpointError(
                f"checkpoint {path} is for a different model ({detail})",
                hint="use the --model preset and --vocab-size the checkpoint was trained with",
            )


@dataclass
class _LogState:
    time_s: float
    step: int
    loss_sum: float
