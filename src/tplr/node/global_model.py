"""Keeping the worker's parameters equal to the run's global model, window by window.

The global model at the start of window ``w + 1`` is the one at the start of ``w`` after
the outer step of ``w``: ``θ ← θ − outer_lr · aggregate``, where the aggregate is the
median-norm-clipped mean of the valid payloads of the peers in the peer list for ``w``
(``peers/{w}.json`` from the lead validator, or every known miner when none exists yet).
Validity is decided by the same checks on every node (no sample digests: only validators
can afford to recompute them), so every honest node applies the same aggregate.

A node that starts (or fell behind, or disagrees with the lead's report) loads the lead's
latest checkpoint and replays the outer steps of the windows since, from the payloads the
miners still keep.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from tplr.comms.errors import NotFound, StoreError
from tplr.comms.retry import retry
from tplr.node.checkpoints import (
    GlobalCheckpointError,
    fetch_checkpoint,
    model_digest,
    read_latest_pointer,
)
from tplr.node.gather import FetchOutcome, ValidatedPayloads, validate_all
from tplr.node.payload import GradientPayload
from tplr.node.peers import read_latest_peer_list
from tplr.node.ranks import Apply, Ranks, Restore
from tplr.node.reports import ReportError, read_report
from tplr.node.runtime import NodeRuntime
from tplr.node.waiting import poll_until_found
from tplr.train.aggregation import AggregationStats, aggregate_deltas
from tplr.train.compression import decompress_all
from tplr.train.worker import TrainWorker

log = logging.getLogger(__name__)

DIGESTS_KEPT = 64


@dataclass
class StepResult:
    """The outer step of one window."""

    window: int
    peer_uids: list[int]
    aggregated: list[int]
    rejected: dict[int, str]
    digest: str  # model digest after the step (start of window + 1)
    stats: AggregationStats | None = None  # None: a null round (nothing valid to apply)
    downloaded_bytes: int = 0
    fetch: FetchOutcome | None = field(default=None, repr=False)


def aggregate_and_apply(
    worker: TrainWorker,
    payloads: dict[int, GradientPayload],
    *,
    chunk_size: int,
    outer_lr: float,
    ranks: Ranks,
) -> AggregationStats:
    """Decompress, clip to the median norm, average (uid order) and apply on every rank.

    Blocking (and, with torchrun followers, a collective)."""
    deltas = {
        uid: decompress_all(payload.tensors, chunk_size, device=worker.device)
        for uid, payload in sorted(payloads.items())
    }
    result = aggregate_deltas(deltas)
    aggregate = result.aggregate
    if ranks.has_followers:
        ranks.send(Apply(outer_lr))
        aggregate = ranks.broadcast_tensors(aggregate, like=dict(worker.model.named_parameters()))
    worker.apply_update(aggregate, outer_lr)
    return result.stats


def restore_everywhere(worker: TrainWorker, params: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Load ``params`` into the worker on every rank. Blocking (a collective with followers)."""
    if ranks.has_followers:
        ranks.send(Restore())
        params = ranks.broadcast_tensors(params, like=dict(worker.model.named_parameters()))
    worker.restore(params)


class GlobalModel:
    """Tracks which window's model the worker holds; steps and syncs it."""

    def __init__(self, rt: NodeRuntime, *, count_rejections: bool = True) -> None:
        self.rt = rt
        self.count_rejections = count_rejections
        self.window: int | None = None  # the worker holds the model at the start of this
        self.digests: dict[int, str] = {}  # window -> digest of the model at its start

    async def peers_for(self, window: int) -> list[int]:
        """The uids whose payloads make up the aggregate of ``window``."""
        store = self.rt.lead_store
        try:
            peer_list = await retry(
                lambda: read_latest_peer_list(store, at_or_before=window),
                self.rt.transfer.retry_policy(),
                describe=f"read the peer list for window {window}",
            )
        except NotFound:
            return await self.rt.stores.directory.miners()
        return list(peer_list.uids)

    async def step(self, window: int, *, prefetched: FetchOutcome | None = None) -> StepResult:
        """Apply the outer step of ``window``; the worker must hold the model of ``window``."""
        if self.window != window:
            raise RuntimeError(f"outer step of window {window} on the model of {self.window}")
        rt = self.rt
        peers = await self.peers_for(window)
        if prefetched is not None and prefetched.covers(peers):
            outcome = prefetched.subset(peers)
        else:
            outcome = await rt.fetcher.fetch(window, peers, max_bytes=rt.schema.max_bytes)
        validated: ValidatedPayloads = await asyncio.to_thread(
            validate_all,
            outcome,
            rt.schema,
            run_id=rt.spec.run_id,
            window_clock=rt.upload_time_clock(),
        )
        self._record_gather(outcome, validated)
        stats = None
        if validated.valid:
            stats = await asyncio.to_thread(
                aggregate_and_apply,
                rt.worker,
                validated.valid,
                chunk_size=rt.spec.compression_chunk_size,
                outer_lr=rt.spec.outer_lr,
                ranks=rt.ranks,
            )
            rt.metrics.record_aggregation(
                outer_step_norm=stats.outer_step_norm, clipped_peers=stats.clipped_count
            )
        else:
            log.info("window %d: null round (no valid payload among %s)", window, peers)
        digest = await self._advance_to(window + 1)
        return StepResult(
            window=window,
            peer_uids=peers,
            aggregated=sorted(validated.valid),
            rejected=validated.rejected,
            digest=digest,
            stats=stats,
            downloaded_bytes=outcome.bytes,
            fetch=outcome,
        )

    def _record_gather(self, outcome: FetchOutcome, validated: ValidatedPayloads) -> None:
        metrics = self.rt.metrics
        metrics.record_gather(seconds=outcome.seconds, gathered=len(validated.valid))
        if self.count_rejections:
            for reason in validated.rejected.values():
                metrics.record_rejection(reason)

    async def _advance_to(self, window: int) -> str:
        params = dict(self.rt.worker.model.named_parameters())
        digest = await asyncio.to_thread(model_digest, params)
        self.window = window
        self.digests[window] = digest
        for old in [w for w in self.digests if w < window - DIGESTS_KEPT]:
            del self.digests[old]
        return digest

    async def load_latest_checkpoint(self) -> None:
        """Load the lead's newest checkpoint (waiting for the first one)."""
        rt = self.rt
        pointer = await poll_until_found(
            lambda: read_latest_pointer(rt.lead_store),
            what=f"the lead validator's first checkpoint (uid {rt.lead_uid})",
            advice="the lead publishes it right after creating run.json",
            clock=rt.clock,
            shutdown=rt.shutdown,
            interval_s=min(5.0, rt.spec.window_seconds / 4),
        )
        if pointer.run_id != rt.spec.run_id:
            raise GlobalCheckpointError(
                f"latest checkpoint is for run {pointer.run_id!r}, this run is {rt.spec.run_id!r}"
            )
        params = await fetch_checkpoint(
            rt.lead_store,
            pointer,
            rt.param_shapes(),
            rt.stores.cache_dir,
            transfer=rt.transfer,
            transfer_metrics=rt.transfer_metrics,
        )
        await asyncio.to_thread(restore_everywhere, rt.worker, params, rt.ranks)
        self.digests.clear()
        await self._advance_to(pointer.window)
        rt.metrics.mark_checkpoint(pointer.created_at_s)
        log.info("loaded checkpoint of window %d (%s)", pointer.window, pointer.model_digest)

    async def catch_up(self, target_window: int) -> list[StepResult]:
        """Bring the model to the start of ``target_window`` (checkpoint, then replay)."""
        if self.window is None or await self._checkpoint_is_ahead(target_window):
            await self.load_latest_checkpoint()
        assert self.window is not None
        if self.window > target_window:
            log.warning(
                "the checkpoint (window %d) is ahead of window %d", self.window, target_window
            )
        results = []
        while self.window < target_window:
            if self.window < target_window - 1:
                log.info("replaying window %d to reach window %d", self.window, target_window)
            results.append(await self.step(self.window))
        return results

    async def join(self, window: int) -> int:
        """Catch up to ``window``, then again while catching up took whole windows.

        Returns the (current) window the node joins at.
        """
        while True:
            await self.catch_up(window)
            now = self.rt.windows.current_window()
            if now <= window:
                return window
            window = now

    async def _checkpoint_is_ahead(self, target_window: int) -> bool:
        """When behind by more than one window, a newer checkpoint beats replaying."""
        if self.window is None or target_window - self.window <= 1:
            return False
        try:
            pointer = await read_latest_pointer(self.rt.lead_store)
        except NotFound:
            return False
        except StoreError as exc:  # replaying instead is slower, never wrong
            log.warning("could not read the latest checkpoint pointer: %s", exc)
            return False
        return pointer.window > self.window

    async def agrees_with_lead(self, window: int) -> bool:
        """False when the lead's report for ``window`` has another model digest than ours."""
        ours = self.digests.get(window + 1)
        if ours is None or self.rt.is_lead:
            return True
        try:
            report = await read_report(self.rt.lead_store, window)
        except (NotFound, ReportError, StoreError):
            return True  # not written yet (or unreadable now): nothing to compare
        if report.model_digest == ours:
            return True
        log.error(
            "window %d: our model %s differs from the lead's %s; resyncing from its checkpoint",
            window,
            ours,
            report.model_digest,
        )
        self.window = None
        return False
