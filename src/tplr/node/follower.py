"""A torchrun rank > 0 of a miner: no network, no store; it computes what rank 0 says.

It receives :class:`~tplr.node.ranks.Start` (the run and the first window), opens the
dataset manager as a non-zero rank (it waits for rank 0's ready markers, never downloads),
builds the same DDP worker, then executes commands until :class:`~tplr.node.ranks.Stop`:
train its share of a window's samples, apply an aggregate, restore parameters.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from tplr.data.manager import SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.sampler import rank_share
from tplr.node.lifecycle import Shutdown
from tplr.node.miner import train_window
from tplr.node.ranks import Apply, Command, Ranks, Restore, Start, Stop, Train
from tplr.node.runtime import manager_config
from tplr.node.settings import NodeSettings
from tplr.node.stores import dataset_uses_r2, embedded_dataset_root
from tplr.node.worker_setup import build_worker
from tplr.protocol.run_spec import RunSpec
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
        dataset = await manager.dataset_for(first.window)
        worker = await asyncio.to_thread(
            build_worker,
            spec,
            settings.node,
            dataset.context_len,
            CollectorRegistry(),
            ranks.context,
        )
        while True:
            command = await asyncio.to_thread(ranks.receive)
            if isinstance(command, Stop):
                log.info("rank %d: rank 0 stopped", ranks.context.rank)
                return
            await execute(command, worker, spec, manager, ranks)


async def execute(
    command: Command,
    worker: TrainWorker,
    spec: RunSpec,
    manager: SharedShardedDatasetManager,
    ranks: Ranks,
) -> None:
    context = ranks.context
    if isinstance(command, Train):
        dataset = await manager.dataset_for(command.window)
        share = rank_share(command.indices, rank=context.rank, world_size=context.world_size)
        await asyncio.to_thread(train_window, worker, spec, dataset, share)
    elif isinstance(command, Apply):
        await asyncio.to_thread(_apply, worker, ranks, command.lr)
    elif isinstance(command, Restore):
        await asyncio.to_thread(_restore, worker, ranks)
    else:
        raise RuntimeError(f"unexpected command from rank 0: {command!r}")


def _apply(worker: TrainWorker, ranks: Ranks, lr: float) -> None:
    aggregate = ranks.broadcast_tensors(None, like=dict(worker.model.named_parameters()))
    worker.apply_update(aggregate, lr)


def _restore(worker: TrainWorker, ranks: Ranks) -> None:
    worker.restore(ranks.broadcast_tensors(None, like=dict(worker.model.named_parameters())))
