"""The validator's measurements of one window's payloads (the rules: protocol/scoring).

With the model of window ``w`` in the worker and the window's secret seed:

1. ``r``: the median norm of every valid payload (the reference every Δ is scaled to).
2. Once per window: the loss and its gradient ``g_H`` on fresh secret rows of the held-out
   shard, and the per-row losses of secret rows of the current shard that no known miner
   was assigned now or earlier on this shard (the gate's control rows ``U``).
3. Per evaluated miner, in a worker thread: the per-row losses of a secret subset of its
   fresh assigned rows ``A`` before, and of ``A`` and ``U`` after ``θ − outer_lr·r·Δ/‖Δ‖``;
   the gate (rank test of the per-row gains) and the first-order held-out reward
   ``outer_lr · (r/n) · g_H·Δ/‖Δ‖ / L_H``. The model is restored afterwards.

Evaluation stops at the phase's real-time budget; the rest are "not evaluated".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tplr.data.dataset import SharedShardedDataset
from tplr.data.loader import Batch, BatchLoader, LoaderConfig
from tplr.protocol.assignment import Assignment, gate_rows
from tplr.protocol.evaluation_plan import window_rng
from tplr.protocol.payload import GradientPayload
from tplr.protocol.run_spec import RunSpec
from tplr.protocol.scoring import EvaluationFailed, GateResult, gate_result
from tplr.train.compression import decompress_all, sparse_norm
from tplr.train.worker import TrainWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Measurement:
    gate: GateResult | None
    raw_reward: float | None
    failure: str | None = None  # a reason label when the evaluation itself failed


@dataclass(frozen=True)
class WindowContext:
    """What every miner of the window is measured against."""

    reference_norm: float
    candidates: int
    heldout_loss: float
    heldout_gradient: dict[str, torch.Tensor]
    control_rows: np.ndarray
    control_before: np.ndarray


def load_batches(
    dataset: SharedShardedDataset, rows: np.ndarray, *, batch_size: int, device: torch.device
) -> list[Batch]:
    """Materialised batches of ``rows`` (blocking)."""
    config = LoaderConfig(batch_size=batch_size)
    with BatchLoader(dataset, np.asarray(rows), config=config, device=device) as loader:
        return list(loader)


class WindowEvaluator:
    """Measures the payloads of one window (the worker holds that window's model)."""

    def __init__(
        self,
        worker: TrainWorker,
        *,
        outer_lr: float,
        chunk_size: int,
        micro_batch_size: int,
        gate_samples: int,
        gate_alpha: float,
        heldout_samples: int,
        seed: int,
    ) -> None:
        self.worker = worker
        self.outer_lr = outer_lr
        self.chunk_size = chunk_size
        self.batch_size = micro_batch_size
        self.gate_samples = gate_samples
        self.gate_alpha = gate_alpha
        self.heldout_samples = heldout_samples
        self.seed = seed

    @classmethod
    def for_run(cls, worker: TrainWorker, spec: RunSpec, *, seed: int) -> WindowEvaluator:
        """The evaluator with the run's outer step, compression and scoring settings."""
        return cls(
            worker,
            outer_lr=spec.outer_lr,
            chunk_size=spec.compression_chunk_size,
            micro_batch_size=spec.micro_batch_size,
            gate_samples=spec.gate_samples,
            gate_alpha=spec.gate_alpha,
            heldout_samples=spec.heldout_samples,
            seed=seed,
        )

    def _losses(self, dataset: SharedShardedDataset, rows: np.ndarray) -> np.ndarray:
        batches = load_batches(dataset, rows, batch_size=self.batch_size, device=self.worker.device)
        return self.worker.sample_losses(batches).numpy().astype(np.float64)

    def _deltas(self, payload: GradientPayload) -> dict[str, torch.Tensor]:
        return decompress_all(payload.tensors, self.chunk_size, device=self.worker.device)

    def norms(self, payloads: Mapping[int, GradientPayload]) -> dict[int, float]:
        """Total norm of every decoded Δ, from its sparse values (blocking)."""
        return {
            uid: sparse_norm(payload.tensors, self.chunk_size) for uid, payload in payloads.items()
        }

    def prepare(
        self,
        dataset: SharedShardedDataset,
        heldout: SharedShardedDataset,
        *,
        reference_norm: float,
        candidates: int,
        taken: np.ndarray,
        recent: np.ndarray,
    ) -> WindowContext:
        """The window's shared measurements (blocking)."""
        rng = window_rng(self.seed, "heldout")
        rows = rng.choice(len(heldout), size=min(self.heldout_samples, len(heldout)), replace=False)
        batches = load_batches(heldout, rows, batch_size=self.batch_size, device=self.worker.device)
        loss, gradient = self.worker.loss_gradient(batches)
        free = np.flatnonzero(~(taken | recent))
        control_rng = window_rng(self.seed, "control")
        control = control_rng.choice(free, size=min(self.gate_samples, free.size), replace=False)
        before = self._losses(dataset, control) if control.size else np.empty(0)
        return WindowContext(reference_norm, candidates, loss, gradient, control, before)

    def measure(
        self,
        dataset: SharedShardedDataset,
        context: WindowContext,
        assignment: Assignment,
        payload: GradientPayload,
        norm: float,
        recent: np.ndarray,
    ) -> Measurement:
        """Gate and reward of one miner (blocking; the model is restored afterwards)."""
        rng = window_rng(self.seed, "gate", assignment.uid)
        empty = np.zeros(len(dataset), dtype=bool)
        assigned, _ = gate_rows(
            rng, assignment.indices, taken=empty, recent=recent, count=self.gate_samples
        )
        delta = self._deltas(payload)
        step = self.outer_lr * context.reference_norm / norm
        raw_reward = (
            step
            / context.candidates
            * sum(float((context.heldout_gradient[name] * delta[name]).sum()) for name in delta)
            / context.heldout_loss
        )
        if assigned.size < 8 or context.control_rows.size < 8:
            log.info(
                "uid %d: too few fresh rows for the gate (%d assigned, %d control)",
                assignment.uid,
                assigned.size,
                context.control_rows.size,
            )
            return Measurement(gate=None, raw_reward=raw_reward)
        before = self._losses(dataset, assigned)
        snapshot = self.worker.snapshot()
        try:
            self.worker.apply_update(delta, step)
            after = self._losses(dataset, assigned)
            control_after = self._losses(dataset, context.control_rows)
        finally:
            self.worker.restore(snapshot)
        try:
            gate = gate_result(
                before - after, context.control_before - control_after, alpha=self.gate_alpha
            )
        except EvaluationFailed as exc:
            return Measurement(gate=None, raw_reward=None, failure=exc.reason)
        return Measurement(gate=gate, raw_reward=raw_reward)


async def measure_all(
    evaluator: WindowEvaluator,
    dataset: SharedShardedDataset,
    context: WindowContext,
    order: Sequence[int],
    assignments: Mapping[int, Assignment],
    payloads: Mapping[int, GradientPayload],
    norms: Mapping[int, float],
    recent: np.ndarray,
    *,
    budget_s: float,
) -> dict[int, Measurement]:
    """Measure ``order`` one by one in worker threads until ``budget_s`` of real time."""
    started = time.monotonic()
    results: dict[int, Measurement] = {}
    for uid in order:
        if time.monotonic() - started > budget_s:
            log.warning(
                "evaluation budget of %.1fs spent after %d of %d miners",
                budget_s,
                len(results),
                len(order),
            )
            break
        results[uid] = await asyncio.to_thread(
            evaluator.measure,
            dataset,
            context,
            assignments[uid],
            payloads[uid],
            norms[uid],
            recent,
        )
    return results
