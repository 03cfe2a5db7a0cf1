"""A validator's judgement of one window ``w``, phase by phase (protocol v2).

1. After the commit deadline: snapshot every known miner's commitment.
2. After the reveal deadline: fetch the revealed payloads; keep those matching their
   commitment; run every payload check (run, window, uid, base model, sample digest,
   layout, values); drop duplicates of earlier commitments or earlier windows.
3. Draw the window's secret seed (the validator's secret + the commitments), choose the
   evaluated subset, measure gate and reward (:mod:`tplr.node.evaluation`).
4. Decide the approved set (:func:`tplr.protocol.approval.decide_approvals`), the weights
   and every miner's verdict and window score.

The judgement does not touch the model beyond measuring (it is restored); applying the
approved set and publishing are the validator's (:mod:`tplr.node.validator`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tplr.data.dataset import SharedShardedDataset
from tplr.node.evaluation import Measurement, WindowEvaluator, measure_all
from tplr.node.network.gather import check_reveals, validate_all
from tplr.node.process.settings import ValidatorConfig
from tplr.node.runtime import NodeRuntime
from tplr.node.scoring import MinerVerdict, ScoreBoard
from tplr.protocol.aggregation import normalisation_weights, reference_norm
from tplr.protocol.approval import Candidate, decide_approvals
from tplr.protocol.assignment import Assignment, assignment_for, recently_assigned
from tplr.protocol.commitments import commitments_digest
from tplr.protocol.duplicates import (
    Fingerprint,
    content_digest,
    find_duplicates,
    parameter_offsets,
    sketch,
)
from tplr.protocol.evaluation_plan import choose_evaluated, window_rng, window_seed
from tplr.protocol.payload import GradientPayload, PayloadExpectation
from tplr.protocol.reasons import RejectReason
from tplr.protocol.scoring import in_bootstrap, relative_rewards

log = logging.getLogger(__name__)

EVALUATION_SHARE = 0.8
"""Of the validation phase, what fetch, checks and evaluation may use (the rest: approval)."""


@dataclass
class Judgement:
    window: int
    peers: list[int]
    approved: dict[int, GradientPayload] = field(default_factory=dict)
    payload_bytes: dict[int, bytes] = field(default_factory=dict, repr=False)
    candidates: dict[int, Candidate] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    excluded: dict[int, RejectReason] = field(default_factory=dict)
    verdicts: dict[int, MinerVerdict] = field(default_factory=dict)
    fingerprints: dict[int, Fingerprint] = field(default_factory=dict)
    reference_norm: float = 0.0
    bootstrap: bool = False
    heldout_loss: float | None = None
    downloaded_bytes: int = 0
    phase_started: float = 0.0  # time.monotonic() at the reveal deadline


class WindowJudge:
    """Runs :meth:`judge` for one window at a time."""

    def __init__(self, rt: NodeRuntime, config: ValidatorConfig, secret: bytes) -> None:
        self.rt = rt
        self.config = config
        self.secret = secret
        self.scoring = rt.spec.scoring_config()
        self.offsets = parameter_offsets(rt.schema.param_shapes, rt.spec.compression_chunk_size)

    async def judge(
        self,
        window: int,
        *,
        base_digest: str,
        board: ScoreBoard,
        history: dict[str, Fingerprint],
        heldout: SharedShardedDataset | None,
    ) -> Judgement:
        rt = self.rt
        peers = await rt.stores.directory.miners()
        result = Judgement(window, peers)
        check_clock = rt.gather.check_upload_time
        await rt.windows.sleep_until(rt.windows.commit_deadline_s(window))
        late_s = -rt.windows.seconds_until(rt.windows.reveal_open_s(window))
        if late_s > 0:  # a commitment seen after reveals were readable proves nothing
            log.warning(
                "window %d: this validator is %.1fs late for the commitment snapshot: every "
                "commitment counts as late (give it more time: a later approval deadline, "
                "fewer evaluated miners, a faster host)",
                window,
                late_s,
            )
        snapshot = await rt.fetcher.snapshot_commitments(
            window, peers, run_id=rt.spec.run_id, windows=rt.windows, check_store_clock=check_clock
        )
        await rt.windows.sleep_until(rt.windows.reveal_deadline_s(window))
        result.phase_started = time.monotonic()  # the phase's budget counts from here
        outcome = await rt.fetcher.fetch(window, snapshot.accepted, max_bytes=rt.schema.max_bytes)
        result.downloaded_bytes = outcome.bytes
        rt.metrics.record_gather(seconds=outcome.seconds, gathered=len(outcome.fetched))
        matched, rejected = await asyncio.to_thread(  # hashes every payload: off the loop
            check_reveals, outcome, snapshot, windows=rt.windows, check_store_clock=check_clock
        )
        rejected.update(snapshot.rejected)
        dataset = await rt.manager.dataset_for(window)
        assignments = await asyncio.to_thread(
            lambda: {uid: assignment_for(rt.spec, dataset, uid, window) for uid in peers}
        )
        expectations = {
            uid: PayloadExpectation(
                run_id=rt.spec.run_id,
                window=window,
                uid=uid,
                base_digest=base_digest,
                sample_digest=assignments[uid].digest,
            )
            for uid in matched
        }
        validated = await asyncio.to_thread(validate_all, matched, rt.schema, expectations)
        rejected.update(validated.rejected)
        valid = await self._without_duplicates(validated.valid, snapshot, history, rejected, result)
        seed = window_seed(
            self.secret, rt.spec.run_id, window, commitments_digest(snapshot.accepted)
        )
        measurements, norms = await self._measure(
            window, dataset, heldout, valid, assignments, board, seed, result
        )
        self._decide(window, valid, snapshot, norms, measurements, board, rejected, result)
        result.payload_bytes = {uid: matched[uid].data for uid in result.approved}
        return result

    async def _without_duplicates(self, valid, snapshot, history, rejected, result) -> dict:
        chunk_size = self.rt.spec.compression_chunk_size

        def fingerprints() -> dict[int, Fingerprint]:
            return {
                uid: Fingerprint(
                    content_digest(payload),
                    sketch(payload, self.offsets, chunk_size),
                    snapshot.accepted[uid].last_modified,
                )
                for uid, payload in valid.items()
            }

        result.fingerprints = await asyncio.to_thread(fingerprints)
        duplicates = await asyncio.to_thread(
            find_duplicates, result.fingerprints, history, threshold=self.scoring.duplicate_cosine
        )
        for uid, why in sorted(duplicates.items()):
            log.info("window %d: uid %d left out as a duplicate: %s", result.window, uid, why)
            rejected[uid] = RejectReason.DUPLICATE
        return {uid: payload for uid, payload in valid.items() if uid not in duplicates}

    async def _measure(
        self,
        window: int,
        dataset: SharedShardedDataset,
        heldout: SharedShardedDataset | None,
        valid: dict[int, GradientPayload],
        assignments: dict[int, Assignment],
        board: ScoreBoard,
        seed: int,
        result: Judgement,
    ) -> tuple[dict[int, Measurement], dict[int, float]]:
        rt, spec = self.rt, self.rt.spec
        evaluator = WindowEvaluator.for_run(rt.worker, spec, seed=seed)
        norms = await asyncio.to_thread(evaluator.norms, valid)
        result.reference_norm = reference_norm(norms)
        if not valid or heldout is None or result.reference_norm <= 0:
            if heldout is None and valid:
                log.warning("window %d: no held-out shard: nothing can be evaluated", window)
            return {}, norms
        order = choose_evaluated(
            sorted(valid),
            board.evidence_counts(),
            self.config.max_miners_per_window,
            window_rng(seed, "subset"),
        )

        def masks() -> tuple[np.ndarray, np.ndarray]:
            taken = np.zeros(len(dataset), dtype=bool)
            for assignment in assignments.values():
                taken[assignment.indices] = True
            return taken, recently_assigned(spec, dataset, result.peers, window)

        taken, recent = await asyncio.to_thread(masks)
        context = await asyncio.to_thread(
            evaluator.prepare,
            dataset,
            heldout,
            reference_norm=result.reference_norm,
            candidates=len(valid),
            taken=taken,
            recent=recent,
        )
        result.heldout_loss = context.heldout_loss
        phase_s = spec.window_seconds * (
            spec.approval_deadline_fraction - spec.reveal_deadline_fraction
        )
        spent_s = time.monotonic() - result.phase_started  # fetch, checks, duplicates
        budget_s = max(1.0, EVALUATION_SHARE * phase_s - spent_s)
        measurements = await measure_all(
            evaluator,
            dataset,
            context,
            order,
            assignments,
            valid,
            norms,
            recent,
            budget_s=budget_s,
        )
        return measurements, norms

    def _decide(self, window, valid, snapshot, norms, measurements, board, rejected, result):
        candidates = {}
        for uid in valid:
            measured = measurements.get(uid)
            failure = None
            if measured is not None and measured.failure is not None:
                failure = RejectReason(measured.failure)
            candidates[uid] = Candidate(
                uid=uid,
                sha256=snapshot.accepted[uid].commitment.payload_sha256,
                size=snapshot.accepted[uid].commitment.payload_bytes,
                norm=norms[uid],
                evaluated=measured is not None,
                gate=None if measured is None else measured.gate,
                raw_reward=None if measured is None else measured.raw_reward,
                failure=failure,
            )
        result.candidates = candidates
        result.bootstrap = in_bootstrap(window, self.scoring)
        approved, excluded = decide_approvals(
            candidates.values(), admitted=board.admitted(), bootstrap=result.bootstrap
        )
        result.approved = {uid: valid[uid] for uid in approved}
        result.weights = normalisation_weights(
            {uid: norms[uid] for uid in approved}, result.reference_norm
        )
        result.excluded = {**rejected, **excluded}
        raw = {uid: c.raw_reward for uid, c in candidates.items() if c.raw_reward is not None}
        passed = [uid for uid, c in candidates.items() if c.gate is not None and c.gate.passed]
        scores = relative_rewards(raw, passed, cap=self.scoring.reward_cap)
        for uid in result.peers:
            candidate = candidates.get(uid)
            result.verdicts[uid] = MinerVerdict(
                reason=result.excluded.get(uid),  # None: approved
                evaluated=candidate is not None and candidate.evaluated,
                gate=None if candidate is None else candidate.gate,
                raw_reward=None if candidate is None else candidate.raw_reward,
                window_score=scores.get(uid, 0.0),
            )
        for uid, reason in result.excluded.items():
            if uid not in result.verdicts:
                result.verdicts[uid] = MinerVerdict(reason=reason)
