"""The training worker: model + optimizers + schedule on one device; under torchrun either
DDP (every rank a replica) or FSDP2 (parameters, gradients and optimizer state sharded).

The node drives it with ``train_steps(batches, n)``; every call runs ``n`` optimizer steps of
``global_batch_size`` sequences each (``micro_batch_size`` x world size x accumulation steps).
Calls are synchronous and compute-bound: the node runs them off the event loop
(``asyncio.to_thread``). Under torchrun every rank must make the same calls in the same
order (under FSDP2 even ``evaluate``, ``pseudo_gradient`` and ``full_parameters`` are
collectives).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tplr.comms.diskspace import FreeSpaceProbe
from tplr.train import checkpoint as ckpt
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.errors import BatchError, TrainConfigError, TrainingDivergedError
from tplr.train.feed import Batch, BatchFeed, BatchSpec, check_batch, fixed_shape_pieces, to_device
from tplr.train.metrics import TrainMetrics
from tplr.train.model.flops import flops_per_token, mfu, peak_flops_for
from tplr.train.model.loss import IGNORE_INDEX, auto_chunk_tokens
from tplr.train.model.memory import choose_parallel
from tplr.train.optim import WarmupCosineSchedule, build_optimizers
from tplr.train.parallel import params as param_ops
from tplr.train.parallel import worker_state
from tplr.train.parallel.distributed import DistContext, resolve_device
from tplr.train.parallel.sharding import build_model, fsdp_sharder, full_tensor

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
        self.parallel = choose_parallel(model_config, config, self.context)
        torch.manual_seed(config.seed)
        # unwrapped (FSDP2 shards it in place): names, state_dict, parameter ops
        self.model = build_model(
            model_config,
            self.device,
            seed=config.seed,
            checkpointing=config.activation_checkpointing,
            shard=self._fsdp_sharder() if self.parallel == "fsdp" else None,
        )
        self.model.loss_chunk_tokens = auto_chunk_tokens(
            config.micro_batch_size * config.seq_len,
            model_config.padded_vocab_size,
            config.loss_chunk_tokens,
        )
        self._ddp = self._wrap_ddp(self.model) if self.parallel == "ddp" else None
        if self.parallel == "fsdp":  # blocks were compiled before sharding
            self._train_module = self._eval_module = self.model
        else:
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

    def _fsdp_sharder(self):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.context.world_size,))
        compile_block = None
        if self.compile_enabled:
            backend = self.config.compile_backend
            compile_block = lambda block: block.compile(backend=backend)  # noqa: E731
        return fsdp_sharder(mesh, compute_dtype=self.autocast_dtype, compile_block=compile_block)

    def _wrap_ddp(self, model: nn.Module) -> DistributedDataParallel:
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
        """DDP all-reduces gradients only on the last micro-step of an optimizer step.

        FSDP2 reduce-scatters every micro-step: deferring would keep whole unsharded
        gradients alive between micro-steps, which is the memory FSDP exists to save."""
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
            norm = nn.utils.clip_grad_norm_(
                self.model.parameters(), self.config.grad_clip_norm, foreach=True
            )  # a replicated DTensor under FSDP2: its local value is the global norm
            norm_sum += full_tensor(norm)
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
        """Token-weighted mean loss over ``batches`` (all ranks together under DDP/FSDP2).

        Every forward has the shape ``(micro_batch_size, seq_len)``: batches are cut and
        padded to it and the padding is masked out of the loss, so a compiled model never
        recompiles for a short last batch."""
        mean = self._mean_loss(batches)
        if self.metrics is not None:
            self.metrics.eval_loss.set(mean)
        return mean

    @torch.no_grad()
    def _mean_loss(self, batches: Iterable[Batch]) -> float:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        counted = torch.zeros((), device=self.device, dtype=torch.float64)
        pieces = self._eval_pieces(batches)
        if self.parallel == "fsdp":  # every rank runs the same number of (collective) forwards
            pieces = self._same_count_everywhere(list(pieces))
        for inputs, targets in pieces:
            with self._autocast():
                loss_sum += self._eval_module(inputs, targets, reduction="sum").double()
            counted += (targets != IGNORE_INDEX).sum()
        totals = torch.stack([loss_sum, counted])
        if self.context.distributed:
            dist.all_reduce(totals)
        loss_total, tokens = totals.tolist()  # sync point
        if tokens == 0:
            raise BatchError("evaluate got no batches", hint="pass at least one validation batch")
        return loss_total / tokens

    def _eval_pieces(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        spec = BatchSpec(
            vocab_size=self.model_config.vocab_size,
            max_seq_len=self.model_config.max_seq_len,
            check_token_ids=self.config.validate_batches,
        )
        for index, raw in enumerate(batches):
            inputs, targets = check_batch(raw, spec, index)
            if hasattr(raw, "to_device"):
                inputs, targets = raw.to_device(self.device)
            else:
                inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            rows, cols = self.config.micro_batch_size, self.config.seq_len
            yield from fixed_shape_pieces(inputs, targets, rows, cols)

    def _same_count_everywhere(self, pieces: list[Batch]) -> list[Batch]:
        count = torch.tensor([len(pieces)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        rows, cols = self.config.micro_batch_size, self.config.seq_len
        empty = torch.zeros((rows, cols), dtype=torch.int64, device=self.device)
        padding = (empty, torch.full_like(empty, IGNORE_INDEX))  # counts nothing
        return pieces + [padding] * (int(count.item()) - len(pieces))

    # -- warm-up -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Compile (and let cuDNN/flash pick kernels) on a dummy batch of the training and
        the evaluation shape, before real work; the parameters are not changed. A no-op
        without compile on the CPU. A collective under torchrun: every rank must call."""
        if not (self.compile_enabled or self.device.type == "cuda"):
            return
        started = time.perf_counter()
        shape = (self.config.micro_batch_size, self.config.seq_len)
        # two tensors, as real batches are (the compiled graph guards on aliasing)
        inputs = torch.zeros(shape, dtype=torch.int64, device=self.device)
        targets = torch.ones(shape, dtype=torch.int64, device=self.device)
        self.model.train()
        with self._grad_sync(last_micro_step=True), self._autocast():
            loss = self._train_module(inputs, targets)
        loss.backward()
        for optimizer in self._optimizers:
            optimizer.zero_grad(set_to_none=True)
        self._mean_loss([(inputs.cpu(), targets.cpu())])  # not a real loss: not recorded
        log.info(
            "warmed up (compile %s) in %.1fs", self.compile_enabled, time.perf_counter() - started
        )

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
        """Parameters copied to CPU (pinned memory on GPU); restore with :meth:`restore`.

        Under FSDP2 this rank's rows only (restore it on the same rank)."""
        return param_ops.snapshot_parameters(self.model, self.device)

    def restore(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Load parameters: full tensors (each FSDP2 rank takes its rows) or a snapshot."""
        param_ops.restore_parameters(self.model, snapshot)

    def pseudo_gradient(self, snapshot: Mapping[str, torch.Tensor]) -> param_ops.ParameterDict:
        """``Δ = θ_snapshot − θ_now``: what this worker's steps since the snapshot did.

        Under FSDP2 each value is a sharded DTensor (``full_tensor()`` gathers it)."""
        return param_ops.pseudo_gradient(self.model, snapshot)

    def apply_update(self, delta: Mapping[str, torch.Tensor], lr: float) -> None:
        """Outer step ``θ ← θ − lr · Δ`` (same on every rank: pass the same Δ everywhere)."""
        param_ops.apply_update(self.model, delta, lr)

    def full_parameters(self, *, keep: bool = True) -> param_ops.ParameterDict:
        """Every parameter whole on the CPU (for digests and published checkpoints).

        Under FSDP2 a collective: every rank calls; ``keep=False`` ranks get ``{}``."""
        return param_ops.full_parameters(self.model, keep=keep)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers)

    def reset_optimizer_state(self) -> None:
        """Drop every moment and step count (as freshly built optimizers)."""
        for optimizer in self._optimizers:
            optimizer.state.clear()

    @property
    def schedule(self) -> WarmupCosineSchedule:
        return self._schedule

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(
        self, path: str | Path, *, free_space_probe: FreeSpaceProbe | None = None
    ) -> None:
        """Rank 0 writes the full state atomically; every rank must call (under FSDP2 the
        state is gathered; the call ends in a barrier). A full disk raises
        :class:`~tplr.comms.errors.InsufficientSpace`."""
        started = time.perf_counter()
        state = worker_state.checkpoint_state(self)
        failure: BaseException | None = None
        if self.context.is_main:
            try:
                ckpt.write_checkpoint_atomic(state, Path(path), free_space_probe=free_space_probe)
            except BaseException as exc:  # raised after the barrier: the others must not hang
                failure = exc
            else:
                if self.metrics is not None:
                    self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
                log.info("saved checkpoint %s at step %d", path, self.step)
        if self.context.distributed:
            dist.barrier()
        if failure is not None:
            raise failure

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizers, step and RNG (any world size; every rank reads the file)."""
        worker_state.load_checkpoint(self, ckpt.read_checkpoint(Path(path)), path)
        log.info("loaded checkpoint %s at step %d", path, self.step)


@dataclass
class _LogState:
    time_s: float
    step: int
    loss_sum: float
