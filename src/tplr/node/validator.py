"""The validator: judge every window, and — the lead — approve exactly what gets aggregated.

Per window ``w`` (protocol v2; the phases are in :mod:`tplr.protocol.clock`):

1. :class:`~tplr.node.judgement.WindowJudge` snapshots the commitments, checks the
   reveals and payloads, measures gate and reward on secret rows, and decides.
2. The **lead** applies the approved set to its own model, copies the approved payloads
   to its bucket and publishes ``approvals/{w}.json`` (with the model digests before and
   after) before the approval deadline; every other validator applies the lead's approval.
3. Each validator publishes ``scores/{w}.json`` (every miner's verdict: gate, reward,
   reason), the admitted peer list for ``w + 1`` and its report; the lead publishes a
   checkpoint every ``checkpoint_every_windows`` windows.

A lead that restarts resumes from its checkpoint, replays its own approvals (one it already
published for the current window stands: miners may have applied it), and publishes an
empty approval for every past window it missed (nobody applied anything then).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time

from tplr.comms.errors import NotFound
from tplr.data.dataset import SharedShardedDataset
from tplr.data.manager import dataset_opener
from tplr.node.global_model import GlobalModel, StepResult, apply_weighted, restore_everywhere
from tplr.node.judgement import Judgement, WindowJudge
from tplr.node.network.approvals import publish_approval, read_approval
from tplr.node.network.checkpoints import (
    CheckpointPublisher,
    load_init_model,
    read_latest_pointer,
)
from tplr.node.network.peers import PEER_LISTS_PREFIX, PeerList, publish_peer_list
from tplr.node.network.reports import REPORTS_PREFIX, WindowReport, publish_report
from tplr.node.process.housekeeping import Housekeeper, run_with_housekeeping
from tplr.node.process.lifecycle import Shutdown
from tplr.node.process.metrics import PeerOutcome
from tplr.node.process.settings import NodeSettings, ValidatorConfig
from tplr.node.runtime import NodeRuntime, check_retention, open_runtime
from tplr.node.scoring import ScoreBoard, ScoringError, publish_scores, read_scores
from tplr.protocol.approval import (
    APPROVALS_PREFIX,
    MIRROR_PREFIX,
    Approval,
    build_approval,
)
from tplr.protocol.duplicates import Fingerprint, aggregate_fingerprint
from tplr.protocol.reasons import RejectReason

log = logging.getLogger(__name__)

HISTORY_WINDOWS = 2
"""Windows of earlier payload fingerprints kept for the replay/duplicate check."""
_NUMBERED = re.compile(r"^(scores|peers|reports|approvals)/(\d+)\.json$")
_MIRRORED = re.compile(r"^approved/(\d+)/(\d+)\.safetensors$")


LATE_OR_ABSENT = {
    RejectReason.NO_COMMITMENT,
    RejectReason.LATE_COMMITMENT,
    RejectReason.NOT_REVEALED,
    RejectReason.LATE_REVEAL,
    RejectReason.TIMEOUT,
    RejectReason.UNREACHABLE,
}
"""Verdicts that mean the miner's work was not there in time (the dashboard's "on time")."""


def peer_outcomes(judged: Judgement) -> dict[int, PeerOutcome]:
    """Each miner's window for the network dashboard: on time, approved, gate, reward."""
    return {
        uid: PeerOutcome(
            on_time=verdict.reason not in LATE_OR_ABSENT,
            approved=verdict.approved,
            gate_passed=None if verdict.gate is None else verdict.gate.passed,
            reward=verdict.window_score,
        )
        for uid, verdict in judged.verdicts.items()
    }


class Validator:
    def __init__(self, rt: NodeRuntime, config: ValidatorConfig) -> None:
        self.rt = rt
        self.config = config
        self.board = ScoreBoard(rt.spec.scoring_config())
        self.model = GlobalModel(rt)
        self.judge = WindowJudge(rt, config, secrets.token_bytes(32))
        self.checkpoints = CheckpointPublisher(
            rt.stores.own,
            rt.stores.cache_dir,
            transfer=rt.transfer,
            keep=config.checkpoints_kept,
            transfer_metrics=rt.transfer_metrics,
        )
        self.history: dict[int, dict[str, Fingerprint]] = {}
        self._heldout: SharedShardedDataset | None = None
        self._heldout_ready = False
        self.last: Judgement | None = None
        self.housekeeper = Housekeeper(self.expire, name=f"validator {rt.uid} retention")

    async def run(self) -> None:
        """The window loop, with retention running beside it in the node's TaskGroup."""
        await run_with_housekeeping(self.window_loop(), self.housekeeper)

    async def window_loop(self) -> None:
        rt = self.rt
        window = await rt.first_window()
        await self.restore_board()
        window = await (self.resume_as_lead(window) if rt.is_lead else self.model.join(window))
        while not rt.shutdown.requested:
            if self.model.window != window:
                caught_up, _ = await rt.shutdown.unless_stopped(
                    self.model.advance_to(window, give_up_at_s=rt.windows.window_end_s(window))
                )
                if not caught_up:
                    break
            if self.model.window == window:
                stopped = not await self.close_window(window)
                if stopped:
                    break
            reached, _ = await rt.shutdown.unless_stopped(rt.windows.wait_for_window(window + 1))
            if not reached:
                break
            window = max(window + 1, rt.windows.current_window())

    # -- start-up -------------------------------------------------------------------------
    async def restore_board(self) -> None:
        """Continue the scores from our newest published board, if any (a broken one is
        logged and ignored: scoring starts afresh)."""
        windows = await self.rt.retried("list our scores", lambda: self._own_windows("scores"))
        if not windows:
            return
        try:
            board = await self.rt.retried(
                "read our last scores", lambda: read_scores(self.rt.stores.own, max(windows))
            )
        except (NotFound, ScoringError) as exc:
            log.warning("starting scores afresh: %s", exc)
            return
        board.config = self.rt.spec.scoring_config()
        self.board = board
        log.info("restored scores of %d miners up to window %s", len(board.peers), board.window)

    async def _own_windows(self, kind: str) -> list[int]:
        return [
            int(match.group(2))
            async for info in self.rt.stores.own.list(f"{kind}/")
            if (match := _NUMBERED.match(info.key)) and match.group(1) == kind
        ]

    async def resume_as_lead(self, window: int) -> int:
        """Start (or resume) the run's model; returns the window to judge next."""
        rt = self.rt
        try:
            await rt.retried(
                "read the latest checkpoint pointer", lambda: read_latest_pointer(rt.stores.own)
            )
        except NotFound:
            await self.publish_initial_model(window)
            return window
        await self.model.load_latest_checkpoint()
        while True:  # every approval already published stands, this window's included
            window = self.model.window
            assert window is not None
            try:
                approval = await read_approval(rt.stores.own, run_id=rt.spec.run_id, window=window)
            except NotFound:
                if window >= rt.windows.current_window():
                    return window  # not judged yet: judge it now
                approval = await self.publish_null_approval(window)
            await self.model.apply(approval)

    async def publish_initial_model(self, window: int) -> None:
        """The first checkpoint: the seeded init, or ``init_model`` (e.g. an old run's)."""
        rt = self.rt
        if self.config.init_model is not None:
            params = await asyncio.to_thread(
                load_init_model, self.config.init_model, rt.param_shapes()
            )
            await asyncio.to_thread(restore_everywhere, rt.worker, params, rt.ranks)
            log.info("starting the run from %s", self.config.init_model)
        digest = await self.model.note_window(window)
        await self.publish_checkpoint(window, digest)

    async def publish_null_approval(self, window: int) -> Approval:
        """An empty approval for a window the lead missed: nobody applied anything then."""
        digest = self.model.digest or ""
        approval = build_approval(
            run_id=self.rt.spec.run_id,
            window=window,
            base_digest=digest,
            result_digest=digest,
            reference_norm=0.0,
            bootstrap=False,
            approved={},
            weights={},
            excluded={},
            published_at_s=self.rt.clock.now(),
        )
        await self.rt.retried(
            f"publish the empty approval of missed window {window}",
            lambda: publish_approval(self.rt.stores.own, approval, {}, transfer=self.rt.transfer),
        )
        log.warning("window %d: missed by the lead; published an empty approval", window)
        return approval

    async def publish_checkpoint(self, window: int, digest: str) -> None:
        params = await asyncio.to_thread(self.rt.worker.snapshot)
        await self.checkpoints.publish(
            params, run_id=self.rt.spec.run_id, window=window, digest=digest
        )
        self.rt.metrics.mark_checkpoint()

    # -- one window -------------------------------------------------------------------------
    async def close_window(self, window: int) -> bool:
        """Judge, apply and publish ``window``; False when a stop request interrupted it."""
        rt = self.rt
        base = self.model.digest
        assert base is not None
        heldout = await self.heldout_shard()
        finished, judged = await rt.shutdown.unless_stopped(
            self.judge.judge(
                window,
                base_digest=base,
                board=self.board,
                history={k: v for h in self.history.values() for k, v in h.items()},
                heldout=heldout,
            )
        )
        if not finished or judged is None:
            return False
        step = await (self.approve(judged) if rt.is_lead else self.follow_lead(judged))
        if step is None:
            return True  # out of sync: the loop resyncs
        self.remember(judged, step)
        await self.publish_judgement(judged)
        rt.metrics.set_peer_outcomes(judged.window, peer_outcomes(judged))
        if rt.is_lead:
            rt.metrics.record_validation_loss(judged.heldout_loss)
        if rt.is_lead and (window + 1) % rt.spec.checkpoint_every_windows == 0:
            await self.publish_checkpoint(window + 1, step.digest)
        await rt.retried(
            f"publish the report of window {window}",
            lambda: publish_report(rt.stores.own, self.report(judged, step)),
        )
        self.log_window(judged, step)
        self.last = judged
        rt.progress.mark_progress(window)
        rt.metrics.mark_progress(window)
        self.housekeeper.window_done(window)
        return True

    async def approve(self, judged: Judgement) -> StepResult:
        """The lead: apply the approved set, then publish the approval and its copies."""
        rt = self.rt
        base = self.model.digest
        assert base is not None
        stats = None
        if judged.approved:
            stats = await asyncio.to_thread(
                apply_weighted,
                rt.worker,
                judged.approved,
                judged.weights,
                chunk_size=rt.spec.compression_chunk_size,
                outer_lr=rt.spec.outer_lr,
                ranks=rt.ranks,
            )
        digest = await self.model.note_window(judged.window + 1)
        approval = build_approval(
            run_id=rt.spec.run_id,
            window=judged.window,
            base_digest=base,
            result_digest=digest,
            reference_norm=judged.reference_norm,
            bootstrap=judged.bootstrap,
            approved={uid: judged.candidates[uid] for uid in judged.approved},
            weights=judged.weights,
            excluded=judged.excluded,
            published_at_s=rt.clock.now(),
        )
        started = time.monotonic()
        await rt.retried(
            f"publish the approval of window {judged.window}",
            lambda: publish_approval(
                rt.stores.own,
                approval,
                judged.payload_bytes,
                transfer=rt.transfer,
                metrics=rt.transfer_metrics,
            ),
        )
        log.debug(
            "window %d: approval published in %.2fs", judged.window, time.monotonic() - started
        )
        rt.metrics.record_aggregation(
            outer_step_norm=0.0 if stats is None else stats.outer_step_norm,
            approved_peers=len(judged.approved),
        )
        return StepResult(
            window=judged.window,
            approved=sorted(judged.approved),
            excluded={uid: str(reason) for uid, reason in judged.excluded.items()},
            digest=digest,
            bootstrap=judged.bootstrap,
            stats=stats,
        )

    async def follow_lead(self, judged: Judgement) -> StepResult | None:
        """Any other validator: apply the lead's approval of the window."""
        rt = self.rt
        _, steps = await rt.shutdown.unless_stopped(
            self.model.advance_to(
                judged.window + 1, give_up_at_s=rt.windows.commit_deadline_s(judged.window + 1)
            )
        )
        return steps[-1] if steps else None

    def remember(self, judged: Judgement, step: StepResult) -> None:
        """Fingerprints of this window's payloads and of its aggregate, for the replay check
        of the next windows (a sketch is linear: the aggregate's is the weighted sum)."""
        window = judged.window
        entries = {f"uid {uid} of window {window}": fp for uid, fp in judged.fingerprints.items()}
        applied = {} if step.stats is None else step.stats.weights  # the lead's weights
        parts = {uid: judged.fingerprints[uid] for uid in applied if uid in judged.fingerprints}
        if parts:  # (another validator may not have fetched all the lead approved)
            entries[f"the aggregate of window {window}"] = aggregate_fingerprint(
                parts, {uid: applied[uid] for uid in parts}
            )
        self.history[window] = entries
        for old in [w for w in self.history if w <= window - HISTORY_WINDOWS]:
            del self.history[old]

    async def publish_judgement(self, judged: Judgement) -> None:
        rt = self.rt
        self.board.close_window(judged.window, judged.verdicts, expected_uids=judged.peers)
        for verdict in judged.verdicts.values():
            if verdict.reason is not None:
                rt.metrics.record_rejection(verdict.reason)
        rt.metrics.set_scores(self.board.scores())
        await rt.retried(
            f"publish the scores of window {judged.window}",
            lambda: publish_scores(rt.stores.own, self.board),
        )
        peer_list = PeerList(
            window=judged.window + 1, uids=tuple(self.board.admitted()), published_by=rt.uid
        )
        await rt.retried(
            f"publish the peer list for window {peer_list.window}",
            lambda: publish_peer_list(rt.stores.own, peer_list),
        )

    def report(self, judged: Judgement, step: StepResult) -> WindowReport:
        return WindowReport(
            run_id=self.rt.spec.run_id,
            role="validator",
            uid=self.rt.uid,
            window=judged.window,
            aggregated_uids=tuple(step.approved),
            rejected={str(uid): str(reason) for uid, reason in judged.excluded.items()},
            model_digest=step.digest,
            outer_step_norm=None if step.stats is None else step.stats.outer_step_norm,
            val_loss=judged.heldout_loss,
            downloaded_bytes=judged.downloaded_bytes,
            finished_at_s=self.rt.clock.now(),
        )

    def log_window(self, judged: Judgement, step: StepResult) -> None:
        verdicts = {
            uid: (
                "approved" if v.reason is None else str(v.reason),
                None if v.gate is None else round(v.gate.z, 2),
                round(v.window_score, 3),
            )
            for uid, v in sorted(judged.verdicts.items())
        }
        log.info(
            "window %d: approved %s%s; verdicts (reason, gate z, reward) %s; val loss %s",
            judged.window,
            step.approved,
            " (bootstrap)" if judged.bootstrap else "",
            verdicts,
            "n/a" if judged.heldout_loss is None else f"{judged.heldout_loss:.4f}",
        )

    # -- the held-out shard -------------------------------------------------------------------
    async def heldout_shard(self) -> SharedShardedDataset | None:
        """The validation shard (fresh random rows of it are drawn every window)."""
        if self._heldout_ready:
            return self._heldout
        manager, spec = self.rt.manager, self.rt.spec
        catalog = manager.catalog
        if catalog is None or not catalog.val:
            log.warning("the dataset has no validation shard: miners cannot be evaluated")
            self._heldout_ready = True
            return None
        shard = catalog.val[0]
        await manager.files.fetch(shard)
        opener = dataset_opener(spec.sequence_length, vocab_size=spec.vocab_size)
        paths = await asyncio.to_thread(manager.files.local_paths, shard.keys)
        self._heldout = await asyncio.to_thread(opener, shard, paths)
        self._heldout_ready = True
        return self._heldout

    # -- retention ----------------------------------------------------------------------------
    async def expire(self, window: int) -> None:
        await self.prune(before=window - self.config.retention_windows)

    async def prune(self, *, before: int) -> None:
        """Delete own scores, peer lists, reports, approvals and copies of windows < before."""
        store = self.rt.stores.own
        victims: list[str] = []
        for prefix in ("scores/", PEER_LISTS_PREFIX, REPORTS_PREFIX, APPROVALS_PREFIX):
            victims += [
                info.key
                async for info in store.list(prefix)
                if (match := _NUMBERED.match(info.key)) and int(match.group(2)) < before
            ]
        victims += [
            info.key
            async for info in store.list(MIRROR_PREFIX)
            if (match := _MIRRORED.match(info.key)) and int(match.group(1)) < before
        ]
        for key in victims:
            await store.delete(key)


async def run_validator(settings: NodeSettings, shutdown: Shutdown) -> None:
    """The validator process's main coroutine."""
    assert settings.validator is not None
    async with open_runtime(settings, shutdown=shutdown) as rt:
        check_retention(
            rt, settings.validator.retention_windows, "TPLR_VALIDATOR_RETENTION_WINDOWS"
        )
        log.info(
            "%svalidator uid %d in run %s; metrics on port %s",
            "lead " if rt.is_lead else "",
            rt.uid,
            rt.spec.run_id,
            rt.health_port,
        )
        await Validator(rt, settings.validator).run()
