"""The validator's judgement of one window's payloads: checks, then loss measurements.

For each miner that posted for window ``w``, evaluated with the model of ``w``:

1. Every payload check, plus the sample digest recomputed from ``(seed, uid, w, shard)``
   and the upload time (the store's LastModified) inside ``w``'s upload window. A failed
   check is a window score of 0 with its reason.
2. The loss on ``eval_assigned_samples`` of the miner's assigned samples and on
   ``eval_random_samples`` random samples of the shard (the same for every miner of the
   window), before and after ``θ ← θ − step_lr · Δ``; the window score rewards the gain on
   the assigned samples beyond the gain on random ones (:func:`~tplr.node.scoring.window_score`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import numpy as np

from tplr.data.dataset import SharedShardedDataset
from tplr.data.loader import Batch, BatchLoader, LoaderConfig
from tplr.node.assignment import Assignment, assignment_for
from tplr.node.gather import FetchOutcome, validate_all
from tplr.node.payload import GradientPayload
from tplr.node.runtime import NodeRuntime
from tplr.node.scoring import EvaluationFailed, measure_delta, window_score
from tplr.node.settings import ValidatorConfig
from tplr.train.compression import decompress_all

log = logging.getLogger(__name__)


@dataclass
class WindowScores:
    window: int
    scores: dict[int, float] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)  # uid -> reason
    missing: list[int] = field(default_factory=list)


class MinerScorer:
    """Scores the payloads of one window at a time (the worker holds that window's model)."""

    def __init__(self, rt: NodeRuntime, config: ValidatorConfig) -> None:
        self.rt = rt
        self.config = config
        self.seed = config.eval_seed if config.eval_seed is not None else secrets.randbits(63)
        self.step_lr = config.score_step_lr or rt.spec.outer_lr

    def batches(self, dataset: SharedShardedDataset, indices: np.ndarray) -> list[Batch]:
        """Materialised evaluation batches (blocking)."""
        config = LoaderConfig(batch_size=self.rt.spec.micro_batch_size)
        with BatchLoader(dataset, indices, config=config, device=self.rt.worker.device) as loader:
            return list(loader)

    async def score_window(self, window: int, outcome: FetchOutcome) -> WindowScores:
        rt = self.rt
        dataset = await rt.manager.dataset_for(window)
        assignments = await asyncio.to_thread(
            lambda: {uid: assignment_for(rt.spec, dataset, uid, window) for uid in outcome.fetched}
        )
        validated = await asyncio.to_thread(
            validate_all,
            outcome,
            rt.schema,
            run_id=rt.spec.run_id,
            window_clock=rt.upload_time_clock(),
            digests={uid: assignment.digest for uid, assignment in assignments.items()},
        )
        result = WindowScores(window, failures=dict(validated.rejected), missing=outcome.missing)
        if not validated.valid:
            return result
        rng = np.random.default_rng([self.seed, window])
        count = min(self.config.eval_random_samples, len(dataset))
        random_indices = rng.choice(len(dataset), size=count, replace=False)
        random_batches = await asyncio.to_thread(self.batches, dataset, random_indices)
        random_before = await asyncio.to_thread(rt.worker.evaluate, random_batches)
        for uid, payload in sorted(validated.valid.items()):
            try:
                result.scores[uid] = await asyncio.to_thread(
                    self.score_one,
                    dataset,
                    assignments[uid],
                    payload,
                    random_batches,
                    random_before,
                )
            except EvaluationFailed as exc:
                result.failures[uid] = exc.reason
                log.info("window %d: uid %d scores 0: %s", window, uid, exc.message)
        return result

    def score_one(
        self,
        dataset: SharedShardedDataset,
        assignment: Assignment,
        payload: GradientPayload,
        random_batches: list[Batch],
        random_before: float,
    ) -> float:
        """One miner's window score (blocking; the model is restored afterwards)."""
        rng = np.random.default_rng([self.seed, assignment.window, assignment.uid])
        count = min(self.config.eval_assigned_samples, assignment.count)
        chosen = rng.choice(assignment.indices, size=count, replace=False)
        assigned_batches = self.batches(dataset, chosen)
        delta = decompress_all(
            payload.tensors, self.rt.spec.compression_chunk_size, device=self.rt.worker.device
        )
        measurement = measure_delta(
            self.rt.worker,
            delta,
            step_lr=self.step_lr,
            assigned_batches=assigned_batches,
            random_batches=random_batches,
            random_before=random_before,
        )
        score = window_score(measurement)
        log.debug(
            "window %d uid %d: %s -> %.5f", assignment.window, assignment.uid, measurement, score
        )
        return score
