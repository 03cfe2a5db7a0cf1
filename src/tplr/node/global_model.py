"""Keeping the worker's parameters equal to the run's global model, window by window.

The global model at the start of window ``w + 1`` is the one at the start of ``w`` after
the outer step of ``w``: ``θ ← θ − outer_lr · Σ weight_i · Δ_i`` over exactly the payloads
the lead approved for ``w`` (``approvals/{w}.json``, with the weights it computed), and
nothing else — an empty approved set is a null round. Before applying, a node checks that
it holds the approval's ``base_digest``; after, that it reached its ``result_digest``.

A node that starts, fell behind, or cannot apply a window exactly (an approval that never
came, a mirrored payload that does not match) never guesses: it loads the lead's latest
checkpoint — one that is past the window it could not apply — and replays the approved
sets of the windows since.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tplr.comms.errors import NotFound, StoreError
from tplr.errors import TplrError
from tplr.node.network.approvals import ApprovalUnavailable, fetch_approved, wait_for_approval
from tplr.node.network.checkpoints import (
    GlobalCheckpointError,
    fetch_checkpoint,
    model_digest,
    read_latest_pointer,
)
from tplr.node.network.waiting import poll_until_found
from tplr.node.process.lifecycle import NodeStopped
from tplr.node.ranks import Apply, Ranks, Restore, gather_full_parameters
from tplr.node.runtime import NodeRuntime
from tplr.protocol.aggregation import AggregationStats, weighted_sum
from tplr.protocol.approval import Approval, ApprovalInvalid
from tplr.protocol.payload import GradientPayload
from tplr.train.compression import decompress_all
from tplr.train.worker import TrainWorker

log = logging.getLogger(__name__)

DIGESTS_KEPT = 64


class OutOfSync(TplrError):
    """This node's model is not the one the lead's approval was made for (or led to)."""

    hint = "the node resyncs from the lead validator's checkpoint"


@dataclass
class StepResult:
    """The outer step of one window."""

    window: int
    approved: list[int]
    excluded: dict[int, str]
    digest: str  # model digest after the step (start of window + 1)
    bootstrap: bool = False
    stats: AggregationStats | None = None  # None: a null round
    downloaded_bytes: int = 0
    payloads: dict[int, GradientPayload] = field(default_factory=dict, repr=False)


def apply_weighted(
    worker: TrainWorker,
    payloads: Mapping[int, GradientPayload],
    weights: Mapping[int, float],
    *,
    chunk_size: int,
    outer_lr: float,
    ranks: Ranks,
) -> AggregationStats:
    """Decompress, sum with the approved weights (uid order), apply on every rank.

    Blocking (and, with torchrun followers, a collective)."""
    deltas = {
        uid: decompress_all(payload.tensors, chunk_size, device=worker.device)
        for uid, payload in sorted(payloads.items())
    }
    aggregate, stats = weighted_sum(deltas, weights)
    if ranks.has_followers:
        ranks.send(Apply(outer_lr))
        aggregate = ranks.broadcast_tensors(aggregate, like=dict(worker.model.named_parameters()))
    worker.apply_update(aggregate, outer_lr)
    return stats


def restore_everywhere(worker: TrainWorker, params: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Load ``params`` into the worker on every rank. Blocking (a collective with followers)."""
    if ranks.has_followers:
        ranks.send(Restore())
        params = ranks.broadcast_tensors(params, like=dict(worker.model.named_parameters()))
    worker.restore(params)


class GlobalModel:
    """Tracks which window's model the worker holds; steps and syncs it."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt
        self.window: int | None = None  # the worker holds the model at the start of this
        self.digests: dict[int, str] = {}  # window -> digest of the model at its start
        self.blocked_at: int | None = None  # a window this node could not apply exactly

    @property
    def digest(self) -> str | None:
        return None if self.window is None else self.digests.get(self.window)

    async def apply(
        self, approval: Approval, payloads: Mapping[int, GradientPayload] | None = None
    ) -> StepResult:
        """Apply the outer step of ``approval.window`` (``payloads``: the lead's own copies;
        else they are fetched from the lead's mirror). Raises OutOfSync/ApprovalUnavailable."""
        rt, window = self.rt, approval.window
        if self.window != window or self.digest != approval.base_digest:
            raise OutOfSync(
                f"window {window}: the approval was made for model {approval.base_digest}, "
                f"this node holds {self.digest} (window {self.window})"
            )
        downloaded = 0
        if payloads is None:
            started = time.monotonic()
            payloads = await fetch_approved(
                rt.fetcher, rt.lead_store, approval, rt.schema, run_id=rt.spec.run_id
            )
            downloaded = sum(approval.entry(uid).bytes for uid in payloads)
            rt.metrics.record_gather(seconds=time.monotonic() - started, gathered=len(payloads))
        stats = None
        if approval.approved:
            stats = await asyncio.to_thread(
                apply_weighted,
                rt.worker,
                payloads,
                approval.weights(),
                chunk_size=rt.spec.compression_chunk_size,
                outer_lr=rt.spec.outer_lr,
                ranks=rt.ranks,
            )
            rt.metrics.record_aggregation(
                outer_step_norm=stats.outer_step_norm, approved_peers=stats.peer_count
            )
        else:
            rt.metrics.record_aggregation(outer_step_norm=0.0, approved_peers=0)
        digest = await self._advance_to(window + 1)
        if digest != approval.result_digest:
            self.window = None
            raise OutOfSync(
                f"window {window}: after the outer step this node holds {digest}, the lead "
                f"reached {approval.result_digest}"
            )
        return StepResult(
            window=window,
            approved=approval.approved_uids(),
            excluded={int(uid): reason for uid, reason in approval.excluded.items()},
            digest=digest,
            bootstrap=approval.bootstrap,
            stats=stats,
            downloaded_bytes=downloaded,
            payloads=dict(payloads),
        )

    async def _advance_to(self, window: int) -> str:
        rt = self.rt  # under FSDP2 the followers join the gather (a collective)
        params = await asyncio.to_thread(gather_full_parameters, rt.worker, rt.ranks)
        digest = await asyncio.to_thread(model_digest, params)
        self.window = window
        self.digests[window] = digest
        for old in [w for w in self.digests if w < window - DIGESTS_KEPT]:
            del self.digests[old]
        return digest

    async def note_window(self, window: int) -> str:
        """The worker now holds the model at the start of ``window``; returns its digest."""
        return await self._advance_to(window)

    async def load_latest_checkpoint(self) -> bool:
        """Load the lead's newest checkpoint (waiting for the first one). False when it is not
        past the window this node is blocked at (then there is nothing to gain yet)."""
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
        if self.blocked_at is not None and pointer.window <= self.blocked_at:
            return False
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
        self.blocked_at = None
        await self._advance_to(pointer.window)
        rt.metrics.mark_checkpoint(pointer.created_at_s)
        log.info("loaded checkpoint of window %d (%s)", pointer.window, pointer.model_digest)
        return True

    async def advance_to(self, target: int, *, give_up_at_s: float) -> list[StepResult]:
        """Apply approved sets until the model is at the start of ``target`` (or until
        ``give_up_at_s`` passes without the next approval). Loads a checkpoint when the
        node holds no model, is far behind, or could not apply a window exactly."""
        rt = self.rt
        results: list[StepResult] = []
        if (self.window is None or await self._checkpoint_is_ahead(target)) and not (
            await self.load_latest_checkpoint()
        ):
            return results
        assert self.window is not None
        while self.window < target:
            window = self.window
            try:
                approval = await wait_for_approval(
                    rt.lead_store,
                    run_id=rt.spec.run_id,
                    window=window,
                    windows=rt.windows,
                    give_up_at_s=give_up_at_s,
                    interval_s=rt.poll_interval_s,
                )
                if approval is None:
                    log.warning("window %d: no approval from the lead in time", window)
                    return results
                if window < target - 1:
                    log.info("replaying window %d to reach window %d", window, target)
                results.append(await self.apply(approval))
            except (ApprovalUnavailable, ApprovalInvalid, OutOfSync) as exc:
                log.error("window %d: %s; waiting for a newer checkpoint", window, exc.message)
                self.window, self.blocked_at = None, window
                return results
        return results

    async def join(self, window: int) -> int:
        """Bring the model to the start of the current window (at least ``window``), again
        while catching up took whole windows. Returns the window the node joins at."""
        rt = self.rt
        while True:
            await self.advance_to(window, give_up_at_s=rt.windows.window_end_s(window))
            now = rt.windows.current_window()
            if self.window == window and now <= window:
                return window
            if self.window != window and now <= window:  # blocked: wait for news
                reached, _ = await rt.shutdown.unless_stopped(rt.windows.wait_for_window(now + 1))
                if not reached:
                    raise NodeStopped("stopped while joining the run")
            window = max(window, rt.windows.current_window())

    async def _checkpoint_is_ahead(self, target_window: int) -> bool:
        """When behind by more than one window, a newer checkpoint beats replaying."""
        if self.window is None or target_window - self.window <= 1:
            return False
        try:
            pointer = await read_latest_pointer(self.rt.lead_store)
        except NotFound:
            return False
        except (StoreError, GlobalCheckpointError) as exc:  # replaying is slower, never wrong
            log.warning("could not read the latest checkpoint pointer: %s", exc)
            return False
        return pointer.window > self.window
