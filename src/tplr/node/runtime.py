"""Everything a running node holds, built in order from its settings.

``async with open_runtime(settings, shutdown=...) as rt:`` does, in order: serve
``/metrics`` and ``/healthz`` (from the first second, with a ``starting: <what it waits
for>`` health and ``tplr_node_state``), open the stores (R2/S3 or embedded), announce the
node (embedded store), find the lead validator, agree on the run (the lead creates
``run.json``; others wait for it; local overrides must match), open the dataset manager on
the run's shard schedule and wait for the first shard, and build the training worker for
the run's model. Everything is closed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from tplr import __version__
from tplr.comms.errors import NotFound
from tplr.comms.retry import retry
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics
from tplr.data.dataset_check import check_dataset_for_run
from tplr.data.dataset_manifest import dataset_info, fetch_manifest
from tplr.data.manager import SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_config import DatasetConfig
from tplr.data.manager_metrics import DatasetMetrics
from tplr.errors import ConfigError
from tplr.node.network.gather import PayloadFetcher
from tplr.node.network.peers import NodeAnnouncement, announce_node
from tplr.node.network.run_spec import publish_run_spec, read_run_spec
from tplr.node.network.stores import NodeStores, open_node_stores
from tplr.node.network.waiting import poll_until_found
from tplr.node.process.health import HealthServer, NodeHealth, ProgressTracker
from tplr.node.process.lifecycle import Shutdown
from tplr.node.process.log_setup import CONTEXT as LOG_CONTEXT
from tplr.node.process.metrics import NodeMetrics
from tplr.node.process.settings import GatherConfig, NodeSettings
from tplr.node.process.state import NodeState
from tplr.node.ranks import Ranks, SingleProcess, Start
from tplr.node.worker_setup import first_shard_and_worker
from tplr.protocol.clock import Clock, SystemClock, WindowClock
from tplr.protocol.payload import PayloadSchema
from tplr.protocol.run_spec import RUN_SPEC_KEY, RunSpec, check_local_overrides
from tplr.train.config import ModelConfig
from tplr.train.errors import TrainConfigError
from tplr.train.parallel.distributed import DistContext, resolve_device
from tplr.train.worker import TrainWorker

log = logging.getLogger(__name__)
T = TypeVar("T")


def single_process_context(settings: NodeSettings) -> DistContext:
    return DistContext(0, 1, 0, resolve_node_device(settings.node.device))


def resolve_node_device(requested: str, local_rank: int = 0) -> torch.device:
    """``TPLR_DEVICE``; ``auto`` on a host without a usable GPU says so loudly."""
    device = resolve_device(requested, local_rank)
    if requested == "auto" and device.type == "cpu":
        log.warning(
            "TPLR_DEVICE=auto found no usable CUDA GPU: TRAINING ON THE CPU (very slow). "
            "If this host has a GPU, check the NVIDIA driver and container toolkit "
            "(`nvidia-smi` inside the container); set TPLR_DEVICE=cuda to fail instead, or "
            "TPLR_DEVICE=cpu to silence this."
        )
    return device


@dataclass
class NodeRuntime:
    role: str
    uid: int
    is_lead: bool
    lead_uid: int
    spec: RunSpec
    windows: WindowClock
    stores: NodeStores
    lead_store: ObjectStore
    manager: SharedShardedDatasetManager
    worker: TrainWorker
    schema: PayloadSchema
    metrics: NodeMetrics
    transfer_metrics: TransferMetrics
    registry: CollectorRegistry
    progress: ProgressTracker
    fetcher: PayloadFetcher
    transfer: TransferConfig
    gather: GatherConfig
    shutdown: Shutdown
    ranks: Ranks
    health: NodeHealth
    poll_interval_s: float = 5.0
    health_port: int | None = None

    @property
    def clock(self) -> Clock:
        return self.windows.clock

    async def retried(self, describe: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """One small request (a report, a score file), retried by the one retry policy."""
        return await retry(attempt, self.transfer.retry_policy(), describe=describe)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.worker.model.named_parameters()}

    async def first_window(self) -> int:
        """The current window, after waiting for genesis if the run starts later."""
        if self.windows.current_window() < 0:
            log.info("run %s starts at window 0; waiting for genesis", self.spec.run_id)
            await self.windows.wait_for_window(0)
        return self.windows.current_window()


def new_registry() -> CollectorRegistry:
    """One registry per node: the node's metrics plus process and platform collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


async def dataset_defaults(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """``vocab_size`` and ``sequence_length`` from the dataset manifest, when it says."""
    try:
        manifest, _ = await fetch_manifest(store, prefix)
    except NotFound:
        return {}
    info = dataset_info(manifest)
    if info is None:
        return {}
    return {"vocab_size": info.vocab_size, "sequence_length": info.seq_len}


async def check_run_before_publishing(spec: RunSpec, stores: NodeStores, prefix: str) -> None:
    """The lead checks the dataset, the model preset and the sequence length *before* it
    creates run.json: a run.json, once written, cannot be changed. The dataset first: a
    misspelled bucket or prefix is named as such (the store's NotFound and its hint)."""
    summary = await check_dataset_for_run(
        stores.dataset,
        prefix,
        sequence_length=spec.sequence_length,
        vocab_size=spec.vocab_size,
    )
    log.info("dataset %s: %s", stores.dataset.url(prefix), summary.describe())
    try:
        model = ModelConfig.preset(spec.model, vocab_size=spec.vocab_size)
    except TrainConfigError as exc:
        raise ConfigError(
            f"the run's model is invalid: {exc.message}",
            hint="set TPLR_RUN_MODEL (--run-model) to one of "
            + ", ".join(ModelConfig.preset_names()),
        ) from None
    if spec.sequence_length - 1 > model.max_seq_len:
        raise ConfigError(
            f"sequence_length {spec.sequence_length} needs a context of "
            f"{spec.sequence_length - 1} tokens; model {spec.model!r} takes at most "
            f"{model.max_seq_len}",
            hint="prepare shards with a shorter --seq-len or pick a model with a longer context",
        )


async def check_dataset_present(stores: NodeStores, config: DatasetConfig) -> None:
    """Fail early, saying how to make a dataset, when the embedded one is empty."""
    if stores.dataset_root is None:
        return
    async for _ in stores.dataset.list(config.prefix):
        return
    folder = stores.dataset_root / config.prefix
    raise ConfigError(
        f"no dataset in the embedded store: {folder} is empty",
        hint=f"build one with `tplr shards prepare --tokenizer bytes --input <.txt files> "
        f"--seq-len 128 --shard-tokens 262144 --out {folder}`, or set the R2_DATASET_* keys "
        "(`make demo` builds and runs a sample network under .tplr/demo/)",
    )


async def resolve_lead_uid(
    settings: NodeSettings, stores: NodeStores, clock: Clock, shutdown: Shutdown
) -> int:
    if settings.is_lead:
        return settings.node.uid
    if settings.node.lead_uid is not None:
        return settings.node.lead_uid

    async def lowest_validator() -> int:
        validators = await stores.directory.validators()
        if not validators:
            raise NotFound("no validator announced yet")
        return min(validators)

    return await poll_until_found(
        lowest_validator,
        what="a validator to announce itself",
        advice="start the lead validator (neurons/validator.py --lead) or set TPLR_LEAD_UID",
        clock=clock,
        shutdown=shutdown,
        interval_s=settings.node.poll_interval_s,
    )


async def agree_on_run(
    settings: NodeSettings,
    stores: NodeStores,
    lead_store: ObjectStore,
    clock: Clock,
    shutdown: Shutdown,
) -> RunSpec:
    """The lead creates run.json (once); others wait for it. Overrides must match."""
    given = settings.run.given()
    if settings.is_lead:
        defaults = await retry(
            lambda: dataset_defaults(stores.dataset, settings.dataset.prefix),
            settings.transfer.retry_policy(),
            describe="read the dataset manifest",
        )
        proposed = settings.run.proposed_spec(dataset_defaults=defaults, now_s=clock.now())
        await check_run_before_publishing(proposed, stores, settings.dataset.prefix)
        published = await retry(
            lambda: publish_run_spec(lead_store, proposed),
            settings.transfer.retry_policy(),
            describe=f"create {lead_store.url(RUN_SPEC_KEY)}",
        )
        spec = published.spec
    else:
        spec = await poll_until_found(
            lambda: read_run_spec(lead_store),
            what=f"run.json at {lead_store.url(RUN_SPEC_KEY)}",
            advice="the lead validator (--lead) creates it",
            clock=clock,
            shutdown=shutdown,
            interval_s=settings.node.poll_interval_s,
            timeout_s=settings.node.run_wait_timeout_s,
        )
    check_local_overrides(spec, given, source=lead_store.url(RUN_SPEC_KEY))
    log.info("run %s: %s", spec.run_id, spec.model_dump_json())
    return spec


def manager_config(config: DatasetConfig, dataset_root: Path | None) -> DatasetConfig:
    """Embedded datasets (``dataset_root``) are read in place: nothing copied or deleted."""
    if dataset_root is None or config.local_dir is not None:
        return config
    return config.model_copy(
        update={"local_dir": dataset_root / config.prefix, "keep_shards": True}
    )


def check_retention(rt: NodeRuntime, retention_windows: int, variable: str) -> None:
    """Late joiners replay from the last checkpoint: payloads must outlive that span."""
    needed = rt.spec.checkpoint_every_windows + 2
    if retention_windows < needed:
        raise ConfigError(
            f"{variable}={retention_windows} is shorter than the run's checkpoint interval "
            f"plus two ({needed}): nodes that join late could not replay",
            hint=f"set {variable} to at least {needed}",
        )


async def _announce(settings: NodeSettings, stores: NodeStores, clock: Clock) -> None:
    if stores.shared is None:
        return
    from tplr.node.network.directory import embedded_prefix

    announcement = NodeAnnouncement(
        uid=settings.node.uid,
        role=settings.role,
        prefix=embedded_prefix(settings.node.uid),
        code_version=__version__,
        announced_at_s=clock.now(),
    )
    shared = stores.shared
    await retry(
        lambda: announce_node(shared, announcement),
        settings.transfer.retry_policy(),
        describe="announce this node",
    )


@dataclass
class _Joined:
    """What the node knows once it has joined the run."""

    stores: NodeStores
    lead_uid: int
    lead_store: ObjectStore
    spec: RunSpec
    windows: WindowClock


def _dataset_manager(
    settings: NodeSettings,
    joined: _Joined,
    registry: CollectorRegistry,
    transfer_metrics: TransferMetrics,
    ranks: Ranks,
) -> SharedShardedDatasetManager:
    spec = joined.spec
    return SharedShardedDatasetManager(
        joined.stores.dataset,
        manager_config(settings.dataset, joined.stores.dataset_root),
        windows_per_shard=spec.windows_per_shard,
        open_shard=dataset_opener(spec.sequence_length, vocab_size=spec.vocab_size),
        transfer=settings.transfer,
        metrics=DatasetMetrics(registry),
        transfer_metrics=transfer_metrics,
        channel=ranks.channel(),
    )


@dataclass
class _Observers:
    """What the node reports through, from process start."""

    registry: CollectorRegistry
    metrics: NodeMetrics
    transfer_metrics: TransferMetrics
    health: NodeHealth


def _assemble(
    settings: NodeSettings,
    joined: _Joined,
    manager: SharedShardedDatasetManager,
    worker: TrainWorker,
    observers: _Observers,
    shutdown: Shutdown,
    ranks: Ranks,
) -> NodeRuntime:
    spec, windows = joined.spec, joined.windows
    transfer_metrics = observers.transfer_metrics
    return NodeRuntime(
        ranks=ranks,
        role=settings.role,
        uid=settings.node.uid,
        is_lead=settings.is_lead,
        lead_uid=joined.lead_uid,
        spec=spec,
        windows=windows,
        stores=joined.stores,
        lead_store=joined.lead_store,
        manager=manager,
        worker=worker,
        schema=PayloadSchema.for_model(
            {n: p.shape for n, p in worker.model.named_parameters()}, spec.compression_settings()
        ),
        metrics=observers.metrics,
        transfer_metrics=transfer_metrics,
        registry=observers.registry,
        progress=ProgressTracker(
            windows, max_stalled_windows=settings.health.health_max_stalled_windows
        ),
        fetcher=PayloadFetcher(
            joined.stores.directory,
            settings.gather,
            settings.transfer.retry_policy(),
            transfer_metrics=transfer_metrics,
        ),
        transfer=settings.transfer,
        gather=settings.gather,
        shutdown=shutdown,
        health=observers.health,
        poll_interval_s=settings.node.poll_interval_s,
    )


async def _join_run(
    settings: NodeSettings,
    stores: NodeStores,
    clock: Clock,
    shutdown: Shutdown,
    health: NodeHealth,
) -> _Joined:
    await check_dataset_present(stores, settings.dataset)
    await _announce(settings, stores, clock)
    if not settings.is_lead and settings.node.lead_uid is None:
        health.phase(NodeState.STARTING, "waiting for a validator to announce itself")
    lead_uid = await resolve_lead_uid(settings, stores, clock, shutdown)
    lead_store = await stores.directory.store_for(lead_uid)
    if settings.is_lead:
        health.phase(NodeState.STARTING, "checking the dataset and creating run.json")
    else:
        health.phase(NodeState.STARTING, f"waiting for run.json at {lead_store.url(RUN_SPEC_KEY)}")
    spec = await agree_on_run(settings, stores, lead_store, clock, shutdown)
    return _Joined(stores, lead_uid, lead_store, spec, spec.window_clock(clock))


@contextlib.asynccontextmanager
async def _observers(
    settings: NodeSettings,
    clock: Clock,
    registry: CollectorRegistry | None,
    serve_health: bool,
) -> AsyncIterator[tuple[_Observers, int | None]]:
    """Metrics and health, served before anything else can block."""
    registry = registry if registry is not None else new_registry()
    metrics = NodeMetrics(role=settings.role, uid=settings.node.uid, registry=registry, clock=clock)
    observers = _Observers(registry, metrics, TransferMetrics(registry), NodeHealth(metrics))
    if not serve_health:
        yield observers, None
        return
    server = HealthServer.from_config(
        settings.health, registry=registry, health=observers.health.status
    )
    async with server:
        yield observers, server.port


@contextlib.asynccontextmanager
async def open_runtime(
    settings: NodeSettings,
    *,
    shutdown: Shutdown,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    serve_health: bool = True,
    ranks: Ranks | None = None,
) -> AsyncIterator[NodeRuntime]:
    """Rank 0's (or the only process's) runtime; ``ranks`` links it to torchrun followers."""
    clock = clock or SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        observers, health_port = await stack.enter_async_context(
            _observers(settings, clock, registry, serve_health)
        )
        health = observers.health
        ranks = ranks or SingleProcess(single_process_context(settings))
        stores = await stack.enter_async_context(
            open_node_stores(
                settings.node, settings.dataset_bucket, settings.gradients_bucket, settings.transfer
            )
        )
        joined = await _join_run(settings, stores, clock, shutdown, health)
        observers.metrics.set_run(
            joined.spec.run_id,
            window_seconds=joined.spec.window_seconds,
            checkpoint_every_windows=joined.spec.checkpoint_every_windows,
        )
        LOG_CONTEXT.run_id, LOG_CONTEXT.window_source = (
            joined.spec.run_id,
            joined.windows.current_window,
        )
        first_window = max(joined.windows.current_window(), 0)
        if ranks.has_followers:
            start = Start(joined.spec.to_json().decode(), first_window)
            await asyncio.to_thread(ranks.send, start)
        manager = await stack.enter_async_context(
            _dataset_manager(
                settings, joined, observers.registry, observers.transfer_metrics, ranks
            )
        )
        health.phase(NodeState.DOWNLOADING, f"the dataset shard of window {first_window}")
        _, worker = await first_shard_and_worker(  # the worker warms up during the download
            manager,
            first_window,
            joined.spec,
            settings.node,
            observers.registry,
            ranks.context,
            error_feedback=settings.role == "miner",
        )
        health.phase(NodeState.JOINING, f"the {joined.spec.model} model is ready")
        rt = _assemble(settings, joined, manager, worker, observers, shutdown, ranks)
        rt.health_port = health_port
        working = NodeState.TRAINING if settings.role == "miner" else NodeState.VALIDATING
        health.track(rt.progress, working)
        yield rt
