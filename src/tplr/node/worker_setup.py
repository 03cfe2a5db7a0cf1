"""The training worker for a run: the run's model preset, batch geometry and inner lr."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tplr.node.settings import NodeConfig
from tplr.protocol.run_spec import RunSpec
from tplr.train.config import ModelConfig, TrainConfig, build_config
from tplr.train.distributed import DistContext
from tplr.train.metrics import TrainMetrics
from tplr.train.worker import TrainWorker

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
        },
    )


def build_worker(
    spec: RunSpec,
    node: NodeConfig,
    context_len: int,
    registry: CollectorRegistry,
    context: DistContext | None = None,
) -> TrainWorker:
    """Blocking (builds the model; under DDP a collective): call it in a worker thread."""
    model = ModelConfig.preset(spec.model, vocab_size=spec.vocab_size)
    return TrainWorker(
        model,
        train_config_for(spec, node, context_len),
        context=context,
        metrics=TrainMetrics(registry),
    )
