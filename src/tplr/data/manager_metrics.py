"""Prometheus metrics of the SharedShardedDatasetManager (registry injectable)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from tplr.data.shard_state import STATE_CODES, ShardState
from tplr.optional_gauge import OptionalGauge

_SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30, 120)
_LEAD_BUCKETS = (0, 1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200)


class DatasetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        self.active_shard = Gauge(
            "tplr_dataset_active_shard",
            "Index of the shard the current windows train on (-1 before the first).",
            registry=registry,
        )
        self.active_shard.set(-1)
        self.shard_state = Gauge(
            "tplr_dataset_shard_state",
            "Lifecycle state per shard: "
            + ", ".join(f"{code}={state.value}" for state, code in STATE_CODES.items()),
            ["shard"],
            registry=registry,
        )
        self.bytes_on_disk = OptionalGauge(
            "tplr_dataset_bytes_on_disk",
            "Bytes of shard files (complete or partial) in the local dataset folder.",
            registry,
        )
        self.free_bytes = OptionalGauge(
            "tplr_dataset_disk_free_bytes",
            "Free bytes on the filesystem holding the dataset folder.",
            registry,
        )
        self.next_shard_bytes = Gauge(
            "tplr_dataset_next_shard_bytes",
            "Size of the next shard to prefetch (0 when none is pending).",
            registry=registry,
        )
        self.prefetch_lead_seconds = Histogram(
            "tplr_dataset_prefetch_lead_seconds",
            "How long before it was needed the next shard was ready.",
            buckets=_LEAD_BUCKETS,
            registry=registry,
        )
        self.swap_seconds = Histogram(
            "tplr_dataset_swap_seconds",
            "Duration of the critical-path part of a shard swap (excluding any stall).",
            buckets=_SWAP_BUCKETS,
            registry=registry,
        )
        self.stall_seconds = Counter(
            "tplr_dataset_stall_seconds_total",
            "Seconds training waited for a shard that was not ready at its window.",
            registry=registry,
        )
        self.stalls = Counter(
            "tplr_dataset_stalls_total",
            "Swaps that had to wait for the next shard.",
            registry=registry,
        )
        self.disk_refusals = Counter(
            "tplr_dataset_disk_refusals_total",
            "Prefetches postponed for lack of disk space.",
            registry=registry,
        )
        self.download_failures = Counter(
            "tplr_dataset_download_failures_total",
            "Shard downloads that failed (after the transfer engine's retries).",
            ["reason"],
            registry=registry,
        )
        self.swaps = Counter(
            "tplr_dataset_swaps_total", "Completed shard swaps.", registry=registry
        )

    def set_state(self, shard: int, state: ShardState) -> None:
        self.shard_state.labels(shard=str(shard)).set(STATE_CODES[state])
