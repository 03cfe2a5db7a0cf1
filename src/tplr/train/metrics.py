"""Prometheus metrics of the training worker (registry injectable; tests pass a fresh one)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from tplr.optional_gauge import OptionalGauge

_CALL_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class TrainMetrics:
    """Counters and gauges updated once per ``train_steps`` call (never inside the hot loop);
    a gauge is absent until its first value (no loss of 0 before the first step)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        self.optimizer_steps = Counter(
            "tplr_train_optimizer_steps_total", "Optimizer steps taken", registry=registry
        )
        self.tokens = Counter(
            "tplr_train_tokens_total", "Tokens trained on by this process", registry=registry
        )
        self.loss = OptionalGauge(
            "tplr_train_loss",
            "Mean training loss of the last call",
            registry,
        )
        self.eval_loss = OptionalGauge(
            "tplr_train_eval_loss",
            "Mean loss of the last evaluation",
            registry,
        )
        self.tokens_per_second = OptionalGauge(
            "tplr_train_tokens_per_second",
            "Training throughput of this process in the last call",
            registry,
        )
        self.mfu = OptionalGauge(
            "tplr_train_mfu_ratio",
            "Model FLOPs utilisation of this device in the last call (0..1; GPU only)",
            registry,
        )
        self.call_duration = Histogram(
            "tplr_train_steps_duration_seconds",
            "Wall time of one train_steps call",
            buckets=_CALL_BUCKETS_S,
            registry=registry,
        )
        self.checkpoint_duration = Histogram(
            "tplr_train_checkpoint_save_duration_seconds",
            "Wall time to write one checkpoint",
            buckets=_CALL_BUCKETS_S,
            registry=registry,
        )
