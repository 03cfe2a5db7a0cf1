"""A torchrun rank > 0 of a miner: no network, no store; it computes what rank 0 says.

It receives :class:`~tplr.node.ranks.Start` (the run and the first window), opens the
dataset manager as a non-zero rank (it waits for rank 0's ready markers, never downloads),
builds the same DDP or FSDP2 worker (and warms it up with rank 0 while the first shard
arrives), then executes commands until :class:`~tplr.node.ranks.Stop`: train its share of
a window's samples and compress its share of the error feedback (saving its part of the
miner state), apply an aggregate, restore parameters, load a saved miner state.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from tplr.data.manager import SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.sampler import rank_share
from tplr.node.miner import train_window
from tplr.node.miner_state import MinerState, SavedState, compress_and_save, miner_compressor
from tplr.node.network.stores import cache_dir_for, dataset_uses_r2, embedded_dataset_root
from tplr.node.process.lifecycle import Shutdown
from tplr.node.process.settings import MinerConfig, NodeSettings
from tplr.node.ranks import Apply, Command, Gather, LoadState, Ranks, Restore, Start, Stop, Train
from tplr.node.runtime import manager_config
from tplr.node.worker_setup import first_shard_and_worker
from tplr.protocol.run_spec import RunSpec
from tplr.train.compression import ErrorFeedbackCompressor
from tplr.train.worker import TrainWorker

log = logging.getLogger(__name__)

FOLLOWER_GRACE_S = 24 * 3600.0
"""Followers stop when rank 0 says so (it gets the same SIGTERM), never on their own."""


def follower_manager(
    settings: NodeSettings, spec: RunSpec, ranks: Ranks
) -> SharedShardedDatasetManager:
    dataset_root = (
        None if dataset_uses_r2(settings.dataset_bucket) else embedded_dataset_root(settings.node)
    )
    return SharedShardedDatasetManager(
        None,
        manager_config(settings.dataset, dataset_root),
        windows_per_shard=spec.windows_per_shard,
        open_shard=dataset_opener(spec.sequence_length, vocab_size=spec.vocab_size),
        channel=ranks.channel(),
        metrics=DatasetMetrics(CollectorRegistry()),
    )


async def follow(settings: NodeSettings, shutdown: Shutdown, ranks: Ranks) -> None:
    """The main coroutine of a rank > 0 (``shutdown`` is rank 0's business)."""
    first = await asyncio.to_thread(ranks.receive)
    if isinstance(first, Stop):
        return
    if not isinstance(first, Start):
        raise RuntimeError(f"rank 0 sent {type(first).__name__} before Start")
    spec = RunSpec.from_json(first.spec_json)
    log.info("rank %d follows run %s", ranks.context.rank, spec.run_id)
    async with follower_manager(settings, spec, ranks) as manager:
        _, worker = await first_shard_and_worker(  # as rank 0 does, in the same order
            manager,
            first.window,
            spec,
            settings.node,
            CollectorRegistry(),
            ranks.context,
            error_feedback=True,
        )
        miner = settings.miner or MinerConfig()
        follower = Follower(
            worker,
            spec,
            manager,
            ranks,
            miner_compressor(spec, ranks.context, offload=miner.error_feedback_offload),
            MinerState(cache_dir_for(settings.node), spec, every_windows=miner.state_every_windows),
        )
        while True:
            command = await asyncio.to_thread(ranks.receive)
            if isinstance(command, Stop):
                log.info("rank %d: rank 0 stopped", ranks.context.rank)
                return
            await follower.execute(command)


class Follower:
    """What a rank > 0 holds between commands."""

    def __init__(
        self,
        worker: TrainWorker,
        spec: RunSpec,
        manager: SharedShardedDatasetManager,
        ranks: Ranks,
        compressor: ErrorFeedbackCompressor,
        state: MinerState,
    ) -> None:
        self.worker, self.spec, self.manager, self.ranks = worker, spec, manager, ranks
        self.compressor, self.state = compressor, state

    async def execute(self, command: Command) -> None:
        worker, ranks = self.worker, self.ranks
        if isinstance(command, Train):
            dataset = await self.manager.dataset_for(command.window)
            await asyncio.to_thread(self._train, command, dataset)
        elif isinstance(command, Apply):
            await asyncio.to_thread(_apply, worker, ranks, command.lr)
        elif isinstance(command, Restore):
            await asyncio.to_thread(_restore, worker, ranks)
        elif isinstance(command, Gather):
            await asyncio.to_thread(worker.full_parameters, keep=False)
        elif isinstance(command, LoadState):
            saved = SavedState(Path(command.folder), command.window, command.world_size)
            await asyncio.to_thread(self.state.load, saved, worker, self.compressor)
        else:
            raise RuntimeError(f"unexpected command from rank 0: {command!r}")

    def _train(self, command: Train, dataset) -> None:
        context = self.ranks.context
        share = rank_share(command.indices, rank=context.rank, world_size=context.world_size)
        _, delta = train_window(self.worker, self.spec, dataset, share)
        compress_and_save(
            self.worker, self.compressor, self.state, command.window, delta, base_digest=None
        )


def _apply(worker: TrainWorker, ranks: Ranks, lr: float) -> None:
    aggregate = ranks.broadcast_tensors(None, like=dict(worker.model.named_parameters()))
    worker.apply_update(aggregate, lr)


def _restore(worker: TrainWorker, ranks: Ranks) -> None:
    worker.restore(ranks.broadcast_tensors(None, like=dict(worker.model.named_parameters())))
