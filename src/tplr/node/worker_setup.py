"""The training worker for a run: the run's model preset, batch geometry and inner lr, the
node's parallelism and activation checkpointing, a memory check before anything is
allocated, and a warm-up (compile, kernel selection) while the first shard downloads."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from tplr.data.manager import SharedShardedDatasetManager
from tplr.errors import ConfigError
from tplr.node.process.settings import NodeConfig
from tplr.protocol.run_spec import RunSpec
from tplr.train.config import ModelConfig, TrainConfig, build_config
from tplr.train.metrics import TrainMetrics
from tplr.train.model.memory import (
    GIB,
    MemorySetup,
    device_capacity_bytes,
    estimate,
    fitting_alternatives,
)
from tplr.train.parallel.distributed import DistContext, resolve_device
from tplr.train.worker import TrainWorker

log = logging.getLogger(__name__)

INNER_SCHEDULE_STEPS = 1 << 40
"""The inner learning rate is constant over a run (no cosine decay inside windows)."""


def train_config_for(spec: RunSpec, node: NodeConfig, context_len: int) -> TrainConfig:
    return build_config(
        TrainConfig,
        {
            "optimizer": "adamw",
            "lr": spec.inner_lr,
            "micro_batch_size": spec.micro_batch_size,
            "global_batch_size": spec.batch_size,
            "seq_len": context_len,
            "device": node.device,
            "seed": spec.seed,
            "warmup_steps": 0,
            "total_steps": INNER_SCHEDULE_STEPS,
            "min_lr_ratio": 1.0,
            "prefetch_batches": 0,  # the BatchLoader already reads ahead
            "parallel": node.parallel,
            "activation_checkpointing": node.activation_checkpointing,
        },
    )


def check_memory(
    model: ModelConfig,
    config: TrainConfig,
    context: DistContext,
    *,
    error_feedback: bool,
    error_feedback_offload: bool = False,
    capacity_bytes: int | None = None,
    enforce: bool = True,
) -> MemorySetup:
    """Refuse, naming settings that would fit, when the estimated peak exceeds the device
    (``capacity_bytes``: default, the GPU's memory or the host's available memory)."""
    from tplr.train.model.memory import choose_parallel

    cuda = context.device.type == "cuda"
    setup = MemorySetup.for_training(
        model,
        config,
        parallel=choose_parallel(model, config, context),
        world_size=context.world_size,
        cuda=cuda,
        error_feedback=error_feedback,
        error_feedback_offload=error_feedback_offload,
    )
    if not enforce:
        return setup
    needed = estimate(setup).total
    capacity = capacity_bytes or device_capacity_bytes(context.device)
    if needed <= capacity:
        return setup
    where = "GPU" if cuda else "host memory"
    fits = fitting_alternatives(setup, capacity, micro_batches=False)  # the run's, not ours
    advice = (
        "; or ".join(_as_settings(alt) for alt in fits)
        if fits
        else (
            "no setting of this node fits: use GPUs with more memory or more of them (torchrun), "
            "or a smaller model preset for the run"
        )
    )
    raise ConfigError(
        f"the model needs about {needed / GIB:.1f} GiB per device ({setup.describe()}), "
        f"the {where} has {capacity / GIB:.1f} GiB",
        hint=f"these fit: {advice}" if fits else advice,
    )


def _as_settings(setup: MemorySetup) -> str:
    parts = [f"TPLR_ACTIVATION_CHECKPOINTING={setup.checkpointing}"]
    if setup.world_size > 1:
        parts.append(f"TPLR_PARALLEL={setup.parallel}")
    if setup.error_feedback_offload:
        parts.append("TPLR_MINER_ERROR_FEEDBACK_OFFLOAD=true")
    parts.append(f"(~{estimate(setup).total / GIB:.1f} GiB)")
    return " ".join(parts)


def build_worker(
    spec: RunSpec,
    node: NodeConfig,
    context_len: int,
    registry: CollectorRegistry,
    context: DistContext | None = None,
    *,
    error_feedback: bool = False,
    warm_up: bool = True,
) -> TrainWorker:
    """Blocking (builds the model; under torchrun collectives): call it in a worker thread.

    Checks the memory estimate first (``TPLR_MEMORY_CHECK``), warms up after."""
    model = ModelConfig.preset(spec.model, vocab_size=spec.vocab_size)
    config = train_config_for(spec, node, context_len)
    context = context or DistContext(0, 1, 0, resolve_device(node.device))
    check_memory(model, config, context, error_feedback=error_feedback, enforce=node.memory_check)
    worker = TrainWorker(model, config, context=context, metrics=TrainMetrics(registry))
    if warm_up:
        worker.warm_up()
    return worker


def context_len_for(manager: SharedShardedDatasetManager, spec: RunSpec) -> int:
    """Tokens per training sample, before the first shard arrives: a stored row of
    ``sequence_length`` (shards with a sample-ids file) predicts ``sequence_length - 1``;
    a token stream (llm.c ``.bin``) gives windows of ``sequence_length``."""
    catalog = manager.catalog
    rows = catalog is not None and catalog.train and len(catalog.train[0].keys) == 2
    return spec.sequence_length - 1 if rows else spec.sequence_length


async def first_shard_and_worker(
    manager: SharedShardedDatasetManager,
    first_window: int,
    spec: RunSpec,
    node: NodeConfig,
    registry: CollectorRegistry,
    context: DistContext | None = None,
    **worker_options: Any,
) -> tuple[Any, TrainWorker]:
    """Build and warm up the worker while the first shard downloads (every rank calls, in
    the same order: the manager's waits are file-based, the worker's collectives are not
    interleaved with other collectives). Returns ``(dataset, worker)``."""
    context_len = context_len_for(manager, spec)
    building = asyncio.create_task(
        asyncio.to_thread(
            build_worker, spec, node, context_len, registry, context, **worker_options
        )
    )
    try:
        dataset = await manager.dataset_for(first_window)
    except BaseException:
        await asyncio.gather(building, return_exceptions=True)
        raise
    worker = await building
    if dataset.context_len != worker.config.seq_len:
        raise ConfigError(
            f"the dataset's samples have {dataset.context_len} tokens of context, the worker "
            f"was built for {worker.config.seq_len}",
            hint="check TPLR_RUN_SEQUENCE_LENGTH against the dataset's stored sequence length",
        )
    return dataset, worker
