"""The validator: per window ``w`` (during ``w + 1``), score the miners that posted for ``w``,
publish ``scores/{w}.json`` and the peer list for ``w + 2``, and apply the same outer step
as the miners. The lead validator also measures the global model on the validation shard
and publishes a checkpoint every ``checkpoint_every_windows`` windows.

The peer list for ``w + 2`` is published during ``w + 1``, a full window before anyone
gathers with it (at the start of ``w + 3``), so a slow validator never leaves miners
reading different lists.
"""

from __future__ import annotations

import asyncio
import logging
import re

import numpy as np

from tplr.comms.errors import NotFound
from tplr.data.dataset import SharedShardedDataset
from tplr.data.loader import Batch
from tplr.data.manager import dataset_opener
from tplr.node.checkpoints import CheckpointPublisher, model_digest, read_latest_pointer
from tplr.node.evaluation import MinerScorer, WindowScores
from tplr.node.global_model import GlobalModel, StepResult
from tplr.node.housekeeping import Housekeeper, run_with_housekeeping
from tplr.node.lifecycle import Shutdown
from tplr.node.node_metrics import PeerOutcome
from tplr.node.payload import RejectReason
from tplr.node.peers import PEER_LISTS_PREFIX, PeerList, publish_peer_list
from tplr.node.reports import REPORTS_PREFIX, WindowReport, publish_report
from tplr.node.runtime import NodeRuntime, check_retention, open_runtime
from tplr.node.scoring import ScoreBoard, ScoringError, publish_scores, read_scores
from tplr.node.settings import NodeSettings, ValidatorConfig

log = logging.getLogger(__name__)

PEER_LIST_LEAD_WINDOWS = 2
"""The peer list published while closing window ``w`` is the one for ``w + 2``."""
_NUMBERED_JSON = re.compile(r"^(scores|peers|reports)/(\d+)\.json$")


def rotating_subset(uids: list[int], window: int, size: int) -> list[int]:
    """All uids, or ``size`` of them starting at a window-dependent offset."""
    ordered = sorted(uids)
    if len(ordered) <= size:
        return ordered
    start = (window * size) % len(ordered)
    return sorted(ordered[(start + i) % len(ordered)] for i in range(size))


def peer_outcomes(
    candidates: list[int], judged: WindowScores, step: StepResult
) -> dict[int, PeerOutcome]:
    """Protocol v1's view of each candidate miner in one window, for the network dashboard."""
    aggregated = set(step.aggregated)
    outcomes = {}
    for uid in candidates:
        failure = judged.failures.get(uid)
        scored = uid in judged.scores
        outcomes[uid] = PeerOutcome(
            on_time=uid not in judged.missing and failure != RejectReason.OUTSIDE_WINDOW,
            approved=uid in aggregated,
            gate_passed=judged.scores[uid] > 0 if scored else (False if failure else None),
            reward=judged.scores.get(uid, 0.0),
        )
    return outcomes


class Validator:
    def __init__(self, rt: NodeRuntime, config: ValidatorConfig) -> None:
        self.rt = rt
        self.config = config
        self.board = ScoreBoard(rt.spec.scoring_config())
        self.model = GlobalModel(rt, count_rejections=False)
        self.scorer = MinerScorer(rt, config)
        self.checkpoints = CheckpointPublisher(
            rt.stores.own,
            rt.stores.cache_dir,
            transfer=rt.transfer,
            keep=config.checkpoints_kept,
            transfer_metrics=rt.transfer_metrics,
        )
        self._val_batches: list[Batch] | None = None
        self.housekeeper = Housekeeper(self.expire, name=f"validator {rt.uid} retention")

    async def run(self) -> None:
        """The window loop, with retention running beside it in the node's TaskGroup."""
        await run_with_housekeeping(self.window_loop(), self.housekeeper)

    async def window_loop(self) -> None:
        rt = self.rt
        window = await rt.first_window()
        await self.restore_board()
        if rt.is_lead:
            await self.ensure_first_checkpoint(window)
        window = await self.model.join(window)
        while not rt.shutdown.requested:
            reached, _ = await rt.shutdown.unless_stopped(rt.windows.wait_for_window(window + 1))
            if not reached:
                break
            if not rt.is_lead and not await self.model.agrees_with_lead(window - 1):
                await self.model.catch_up(window)
            await self.close_window(window)
            window += 1

    async def restore_board(self) -> None:
        """Continue the moving averages from our newest published scores, if any."""
        windows = await self.rt.retried("list our scores", self._scored_windows)
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

    async def _scored_windows(self) -> list[int]:
        return [
            int(match.group(2))
            async for info in self.rt.stores.own.list("scores/")
            if (match := _NUMBERED_JSON.match(info.key))
        ]

    async def ensure_first_checkpoint(self, window: int) -> None:
        """The lead publishes the initial model, so every node starts from the same bytes."""
        try:
            await self.rt.retried(
                "read the latest checkpoint pointer",
                lambda: read_latest_pointer(self.rt.stores.own),
            )
            return
        except NotFound:
            pass
        params = dict(self.rt.worker.model.named_parameters())
        digest = await asyncio.to_thread(model_digest, params)
        await self.publish_checkpoint(window, digest)

    async def publish_checkpoint(self, window: int, digest: str) -> None:
        params = await asyncio.to_thread(self.rt.worker.snapshot)
        await self.checkpoints.publish(
            params, run_id=self.rt.spec.run_id, window=window, digest=digest
        )
        self.rt.metrics.mark_checkpoint()

    # -- one window ------------------------------------------------------------------------
    async def close_window(self, window: int) -> None:
        rt = self.rt
        if self.model.window != window:
            await self.model.catch_up(window)
        candidates = rotating_subset(
            await rt.stores.directory.miners(), window, self.config.max_miners_per_window
        )
        peers = await self.model.peers_for(window)
        outcome = await rt.fetcher.fetch(
            window, set(candidates) | set(peers), max_bytes=rt.schema.max_bytes
        )
        judged = await self.scorer.score_window(window, outcome.subset(candidates))
        await self.publish_judgement(window, judged, candidates)
        step = await self.model.step(window, prefetched=outcome)
        rt.metrics.set_peer_outcomes(window, peer_outcomes(candidates, judged, step))
        val_loss = await self.validation_loss() if rt.is_lead else None
        rt.metrics.record_validation_loss(val_loss)
        if rt.is_lead and (window + 1) % rt.spec.checkpoint_every_windows == 0:
            await self.publish_checkpoint(window + 1, step.digest)
        report = self.report(window, step, val_loss)
        await rt.retried(
            f"publish the report of window {window}", lambda: publish_report(rt.stores.own, report)
        )
        self.log_window(window, judged, step, val_loss)
        rt.progress.mark_progress(window)
        rt.metrics.mark_progress(window)
        self.housekeeper.window_done(window)

    async def expire(self, window: int) -> None:
        await self.prune(before=window - self.config.retention_windows)

    async def publish_judgement(
        self, window: int, judged: WindowScores, candidates: list[int]
    ) -> None:
        rt = self.rt
        self.board.close_window(
            window, scores=judged.scores, failures=judged.failures, expected_uids=candidates
        )
        for reason in judged.failures.values():
            rt.metrics.record_rejection(reason)
        rt.metrics.set_scores(self.board.scores())
        await rt.retried(
            f"publish the scores of window {window}",
            lambda: publish_scores(rt.stores.own, self.board),
        )
        peer_list = PeerList(
            window=window + PEER_LIST_LEAD_WINDOWS,
            uids=tuple(self.next_peers(judged)),
            published_by=rt.uid,
        )
        await rt.retried(
            f"publish the peer list for window {peer_list.window}",
            lambda: publish_peer_list(rt.stores.own, peer_list),
        )

    def next_peers(self, judged: WindowScores) -> list[int]:
        """The top peers by moving score; while nobody has earned a score yet (early in a
        run, gains on assigned and random samples are alike), every miner whose payload
        passed all checks this window, so that training does not stall on null rounds."""
        top = self.board.top_peers()
        if top:
            return top
        return sorted(judged.scores)[: self.board.config.top_n]

    def report(self, window: int, step: StepResult, val_loss: float | None) -> WindowReport:
        return WindowReport(
            run_id=self.rt.spec.run_id,
            role="validator",
            uid=self.rt.uid,
            window=window,
            aggregated_uids=tuple(step.aggregated),
            rejected={str(uid): reason for uid, reason in step.rejected.items()},
            model_digest=step.digest,
            outer_step_norm=None if step.stats is None else step.stats.outer_step_norm,
            val_loss=val_loss,
            downloaded_bytes=step.downloaded_bytes,
            finished_at_s=self.rt.clock.now(),
        )

    def log_window(
        self, window: int, judged: WindowScores, step: StepResult, val_loss: float | None
    ) -> None:
        scores = {uid: round(score, 5) for uid, score in self.board.scores().items()}
        log.info(
            "window %d: window scores %s, failed %s, missing %s; moving scores %s; "
            "aggregated %s; val loss %s",
            window,
            {uid: round(s, 5) for uid, s in judged.scores.items()},
            judged.failures,
            judged.missing,
            scores,
            step.aggregated,
            "n/a" if val_loss is None else f"{val_loss:.4f}",
        )

    # -- the lead's validation loss -----------------------------------------------------------
    async def validation_loss(self) -> float | None:
        batches = await self.validation_batches()
        if not batches:
            return None
        return await asyncio.to_thread(self.rt.worker.evaluate, batches)

    async def validation_batches(self) -> list[Batch]:
        """The first ``eval_val_samples`` rows of the held-out shard (fixed across windows)."""
        if self._val_batches is not None:
            return self._val_batches
        manager, spec = self.rt.manager, self.rt.spec
        catalog = manager.catalog
        if catalog is None or not catalog.val:
            log.warning("the dataset has no validation shard: no validation loss")
            self._val_batches = []
            return []
        shard = catalog.val[0]
        await manager.files.fetch(shard)
        opener = dataset_opener(spec.sequence_length, vocab_size=spec.vocab_size)
        paths = manager.files.local_paths(shard.keys)
        dataset: SharedShardedDataset = await asyncio.to_thread(opener, shard, paths)
        count = min(self.config.eval_val_samples, len(dataset))
        indices = np.arange(count)
        self._val_batches = await asyncio.to_thread(self.scorer.batches, dataset, indices)
        return self._val_batches

    async def prune(self, *, before: int) -> None:
        """Delete own scores, peer lists and reports of windows ``< before``."""
        store = self.rt.stores.own
        for prefix in ("scores/", PEER_LISTS_PREFIX, REPORTS_PREFIX):
            victims = [
                info.key
                async for info in store.list(prefix)
                if (match := _NUMBERED_JSON.match(info.key)) and int(match.group(2)) < before
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
