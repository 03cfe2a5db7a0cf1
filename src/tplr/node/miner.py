"""The miner (protocol v2): per window, train, commit, reveal, then apply the approved set.

Window ``w`` (the phases are in :mod:`tplr.protocol.clock`):

1. The assigned samples (sampler of ``(seed, uid, w, shard)``), batches from the loader.
2. ``snapshot()``; ``inner_steps`` optimizer steps; ``Δ = θ_start − θ_end``; ``restore()``.
3. Error feedback and chunked top-k; the payload carries the digest of ``θ_start``.
4. Before the commit deadline: only ``commitments/{w}/{uid}.json`` (SHA-256 and size of
   the payload). In the reveal phase: the payload ``gradients/{w}/{uid}.safetensors``.
5. The lead's approval of ``w`` (waited for, bounded), the approved payloads from the
   lead's copies, the outer step — identical on every honest node, checked against the
   approval's digest. A node that cannot apply a window exactly resyncs from a checkpoint.

Compute runs in worker threads; the event loop keeps serving transfers and ``/metrics``.
The hooks :meth:`Miner.assignment`, :meth:`Miner.produce_payload`, :meth:`Miner.commit`
and :meth:`Miner.reveal` are the seams where the tests' adversaries deviate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from tplr.comms.errors import StoreError
from tplr.comms.upload import upload_bytes
from tplr.data.dataset import SharedShardedDataset
from tplr.data.loader import BatchLoader, LoaderConfig
from tplr.data.sampler import rank_share
from tplr.node.global_model import GlobalModel, StepResult
from tplr.node.miner_state import MinerState, compress_and_save, miner_compressor, resume
from tplr.node.network.reports import REPORTS_PREFIX, WindowReport, publish_report
from tplr.node.process.housekeeping import Housekeeper, run_with_housekeeping
from tplr.node.process.lifecycle import NodeStopped, Shutdown
from tplr.node.process.settings import MinerConfig, NodeSettings
from tplr.node.ranks import Ranks, Stop, Train
from tplr.node.runtime import NodeRuntime, check_retention, open_runtime
from tplr.protocol.assignment import Assignment, assignment_for
from tplr.protocol.commitments import COMMITMENTS_PREFIX, Commitment, commit_to, commitment_key
from tplr.protocol.payload import PayloadMeta, encode_payload, payload_key
from tplr.protocol.run_spec import RunSpec
from tplr.train.compression import CompressedTensor, CompressionError
from tplr.train.errors import TrainingDivergedError
from tplr.train.worker import TrainStats, TrainWorker

log = logging.getLogger(__name__)

_OWN_KEY = re.compile(r"^(?:gradients|commitments)/(\d+)/(\d+)\.(?:safetensors|json)$")
_OWN_REPORT_KEY = re.compile(r"^reports/(\d+)\.json$")


@dataclass
class WindowWork:
    """What the miner did in one window."""

    window: int
    stats: TrainStats | None = None
    committed: bool = False
    uploaded_bytes: int = 0


def train_window(
    worker: TrainWorker, spec: RunSpec, dataset: SharedShardedDataset, indices: np.ndarray
) -> tuple[TrainStats, dict[str, torch.Tensor]]:
    """``inner_steps`` steps on ``indices`` from θ_start; returns the stats and
    ``Δ = θ_start − θ_end``, with θ_start restored (the outer step starts from it). Blocking."""
    snapshot = worker.snapshot()
    try:
        loader_config = LoaderConfig(batch_size=spec.micro_batch_size)
        with BatchLoader(dataset, indices, config=loader_config, device=worker.device) as batches:
            stats = worker.train_steps(batches, spec.inner_steps)
        delta = worker.pseudo_gradient(snapshot)
    finally:
        worker.restore(snapshot)
    return stats, delta


class Miner:
    def __init__(self, rt: NodeRuntime, config: MinerConfig) -> None:
        self.rt = rt
        self.config = config
        self.model = GlobalModel(rt)
        # durable miner state (tplr.node.miner_state): error feedback split across ranks
        offload = config.error_feedback_offload
        self.compressor = miner_compressor(rt.spec, rt.ranks.context, offload=offload)
        self.state = MinerState(
            rt.stores.cache_dir, rt.spec, every_windows=config.state_every_windows
        )
        self.work: WindowWork | None = None
        self.housekeeper = Housekeeper(self.expire, name=f"miner {rt.uid} retention")

    # -- the window loop ---------------------------------------------------------------
    async def run(self) -> None:
        """The window loop, with retention running beside it in the node's TaskGroup."""
        await run_with_housekeeping(self.window_loop(), self.housekeeper)

    async def window_loop(self) -> None:
        rt = self.rt
        window = await self.model.join(await rt.first_window())
        await asyncio.to_thread(  # miner state: resume error feedback and optimizer state
            resume, self.state, rt.worker, self.compressor, rt.ranks, self.model.digests, window
        )
        while not rt.shutdown.requested:
            self.work = WindowWork(window)
            if self.model.window == window:
                self.work = await self.work_window(window)
            applied, steps = await rt.shutdown.unless_stopped(
                self.model.advance_to(
                    window + 1, give_up_at_s=rt.windows.commit_deadline_s(window + 1)
                )
            )
            if not applied or steps is None:
                break
            await self.finish_window(window, steps)
            reached, _ = await rt.shutdown.unless_stopped(rt.windows.wait_for_window(window + 1))
            if not reached:
                break
            window = max(window + 1, rt.windows.current_window())

    async def work_window(self, window: int) -> WindowWork:
        """Train, commit and reveal for ``window`` (skipping what cannot be done in time)."""
        rt = self.rt
        work = WindowWork(window)
        if self.state.already_done(window):  # miner state: payload made before a restart
            log.info("window %d: payload made before the restart; waiting for the next", window)
            return work
        dataset = await rt.manager.dataset_for(window)
        assignment = self.assignment(dataset, window)
        try:
            data, work.stats = await self.produce_payload(dataset, assignment)
        except (TrainingDivergedError, CompressionError) as exc:
            log.error("window %d: no payload this window: %s", window, exc)
            return work
        if rt.shutdown.requested:
            log.info("window %d: stopping before the commitment", window)
            return work
        late_s = -rt.windows.seconds_until(rt.windows.commit_deadline_s(window))
        if late_s > 0:
            log.warning("window %d: finished %.1fs after the commit deadline", window, late_s)
            return work
        commitment = await asyncio.to_thread(  # SHA-256 of megabytes: off the loop
            commit_to, data, run_id=rt.spec.run_id, window=window, uid=rt.uid
        )
        work.committed = await self.commit(window, commitment)
        if not work.committed:
            return work
        reached, _ = await rt.shutdown.unless_stopped(
            rt.windows.sleep_until(rt.windows.reveal_open_s(window))
        )
        if reached:
            work.uploaded_bytes = await self.reveal(window, data)
        return work

    # -- hooks -------------------------------------------------------------------------
    def assignment(self, dataset: SharedShardedDataset, window: int) -> Assignment:
        """The samples to train on (an adversary trains on others)."""
        return assignment_for(self.rt.spec, dataset, self.rt.uid, window)

    async def produce_payload(
        self, dataset: SharedShardedDataset, assignment: Assignment
    ) -> tuple[bytes, TrainStats | None]:
        """Train on ``assignment`` and encode the compressed Δ (an adversary forges it)."""
        stats, compressed = await asyncio.to_thread(self.train_and_compress, dataset, assignment)
        self.observe_training(stats)
        return await asyncio.to_thread(self.encode, assignment, compressed), stats

    def encode(self, assignment: Assignment, compressed: dict[str, CompressedTensor]) -> bytes:
        meta = PayloadMeta(
            run_id=self.rt.spec.run_id,
            window=assignment.window,
            uid=self.rt.uid,
            base_digest=self.model.digest or "",
            sample_digest=assignment.digest,
            sample_count=assignment.count,
        )
        return encode_payload(meta, compressed)

    async def commit(self, window: int, commitment: Commitment) -> bool:
        """Publish the commitment before the deadline; False when that failed."""
        return (
            await self.upload(
                window,
                commitment.to_json(),
                commitment_key(window, self.rt.uid),
                deadline_s=self.rt.windows.commit_deadline_s(window),
                what="commitment",
            )
            > 0
        )

    async def reveal(self, window: int, data: bytes) -> int:
        """Upload the committed payload before the reveal deadline; returns its bytes."""
        uploaded = await self.upload(
            window,
            data,
            payload_key(window, self.rt.uid),
            deadline_s=self.rt.windows.reveal_deadline_s(window),
            what="payload",
        )
        if uploaded:
            self.rt.metrics.payload_bytes.set(uploaded)
        return uploaded

    # -- steps ---------------------------------------------------------------------------
    def train_and_compress(
        self, dataset: SharedShardedDataset, assignment: Assignment
    ) -> tuple[TrainStats, dict[str, CompressedTensor]]:
        """Inner steps from θ_start, Δ = θ_start − θ_end, restore θ_start, compress. Blocking.

        Under torchrun every rank trains on its share of the assignment (DDP averages the
        gradients); rank 0 tells the others which window and samples first.
        """
        ranks = self.rt.ranks
        if ranks.has_followers:
            ranks.send(Train(assignment.window, assignment.indices))
        share = rank_share(
            assignment.indices, rank=ranks.context.rank, world_size=ranks.context.world_size
        )
        stats, delta = train_window(self.rt.worker, self.rt.spec, dataset, share)
        digest = self.model.digests.get(assignment.window)  # miner state: the base model
        compressed = compress_and_save(
            self.rt.worker, self.compressor, self.state, assignment.window, delta,
            base_digest=digest,
        )  # fmt: skip
        return stats, compressed

    def observe_training(self, stats: TrainStats) -> None:
        metrics = self.rt.metrics
        mfu = math.nan if stats.mfu is None else stats.mfu
        metrics.observe_training(loss=stats.loss, tokens_per_second=stats.tokens_per_s, mfu=mfu)
        per_step_s = stats.seconds / stats.steps
        for _ in range(stats.steps):
            metrics.inner_step_seconds.observe(per_step_s)

    async def upload(
        self, window: int, data: bytes, key: str, *, deadline_s: float, what: str
    ) -> int:
        """Upload before ``deadline_s``; a missed deadline is logged, not fatal. Returns bytes."""
        rt = self.rt
        remaining_s = rt.windows.seconds_until(deadline_s)
        if remaining_s <= 0:
            log.warning("window %d: the %s deadline passed %.1fs ago", window, what, -remaining_s)
            return 0
        started = time.monotonic()
        try:
            async with asyncio.timeout(remaining_s):
                await upload_bytes(
                    rt.stores.own, data, key, config=rt.transfer, metrics=rt.transfer_metrics
                )
        except TimeoutError:
            log.warning("window %d: upload of %s missed the %s deadline", window, key, what)
            return 0
        except StoreError as exc:
            if not exc.retryable:
                raise  # wrong keys or bucket: the operator must fix it
            log.warning("window %d: upload of %s failed after retries: %s", window, key, exc)
            return 0
        if what == "payload":
            rt.metrics.record_upload(seconds=time.monotonic() - started, payload_bytes=len(data))
        log.info("window %d: uploaded %s (%d bytes)", window, rt.stores.own.url(key), len(data))
        return len(data)

    async def finish_window(self, window: int, steps: list[StepResult]) -> None:
        rt = self.rt
        own_step = next((step for step in steps if step.window == window), None)
        if own_step is not None:
            report = self.report(window, own_step)
            await rt.retried(
                f"publish the report of window {window}",
                lambda: publish_report(rt.stores.own, report),
            )
            rt.progress.mark_progress(window)
            rt.metrics.mark_progress(window)
        self.housekeeper.window_done(window)

    async def expire(self, window: int) -> None:
        await self.prune(before=window - self.config.retention_windows)

    def report(self, window: int, step: StepResult) -> WindowReport:
        work = self.work if self.work is not None and self.work.window == window else None
        return WindowReport(
            run_id=self.rt.spec.run_id,
            role="miner",
            uid=self.rt.uid,
            window=window,
            aggregated_uids=tuple(step.approved),
            rejected={str(uid): reason for uid, reason in step.excluded.items()},
            model_digest=step.digest,
            outer_step_norm=None if step.stats is None else step.stats.outer_step_norm,
            train_loss=None if work is None or work.stats is None else work.stats.loss,
            uploaded_bytes=0 if work is None else work.uploaded_bytes,
            downloaded_bytes=step.downloaded_bytes,
            finished_at_s=self.rt.clock.now(),
        )

    async def prune(self, *, before: int) -> None:
        """Delete own payloads, commitments and reports of windows ``< before``."""
        store = self.rt.stores.own
        victims: list[str] = []
        for prefix in ("gradients/", COMMITMENTS_PREFIX):
            victims += [
                info.key
                async for info in store.list(prefix)
                if (match := _OWN_KEY.match(info.key)) and int(match.group(1)) < before
            ]
        victims += [
            info.key
            async for info in store.list(REPORTS_PREFIX)
            if (match := _OWN_REPORT_KEY.match(info.key)) and int(match.group(1)) < before
        ]
        for key in victims:
            await store.delete(key)


async def run_miner(settings: NodeSettings, shutdown: Shutdown, ranks: Ranks | None = None) -> None:
    """The main coroutine of the miner process (of rank 0 under torchrun).

    When it ends cleanly, the torchrun followers are told to stop. After a failure they are
    not (they may be inside a collective): rank 0 exits non-zero and torchrun ends them.
    """
    assert settings.miner is not None
    clean = False
    try:
        async with open_runtime(settings, shutdown=shutdown, ranks=ranks) as rt:
            check_retention(rt, settings.miner.retention_windows, "TPLR_MINER_RETENTION_WINDOWS")
            log.info(
                "miner uid %d in run %s (%d process(es)); metrics on port %s",
                rt.uid,
                rt.spec.run_id,
                rt.ranks.context.world_size,
                rt.health_port,
            )
            await Miner(rt, settings.miner).run()
        clean = True
    except NodeStopped:
        clean = True
        raise
    finally:
        if clean and ranks is not None and ranks.has_followers:
            await asyncio.to_thread(ranks.send, Stop())
