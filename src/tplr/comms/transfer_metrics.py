"""Prometheus metrics of the transfer engine, shared by downloads and uploads.

Every metric carries a ``direction`` label (``download`` or ``upload``)::

    tplr_transfer_bytes_total{direction}               bytes of completed parts
    tplr_transfer_requests_total{direction}            requests: parts, HEADs, failed tries
    tplr_transfer_retries_total{direction,reason}      retries by reason: throttled, transient, …
    tplr_transfer_part_seconds{direction}              histogram: one part, slot to last byte
    tplr_transfer_active{direction}                    transfers in progress
    tplr_transfer_integrity_failures_total{direction}  parts/objects whose hash mismatched

The registry is injectable; tests pass a fresh ``CollectorRegistry()``. Nothing is
registered at import time: :func:`default_transfer_metrics` creates the process-wide
instance (on the default registry) on first use.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

Direction = Literal["download", "upload"]
PART_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, float("inf"))


class TransferMetrics:
    """The transfer metrics on one registry. Thread-safe (prometheus-client is)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        labels = ["direction"]
        self.bytes = Counter(
            "tplr_transfer_bytes", "Bytes of completed parts.", labels, registry=registry
        )
        self.requests = Counter(
            "tplr_transfer_requests",
            "Requests made: parts, HEADs and failed attempts.",
            labels,
            registry=registry,
        )
        self.retries = Counter(
            "tplr_transfer_retries",
            "Retried requests, by reason (throttled, transient, changed, integrity).",
            ["direction", "reason"],
            registry=registry,
        )
        self.part_seconds = Histogram(
            "tplr_transfer_part_seconds",
            "Seconds per part, from taking a concurrency slot to its last byte.",
            labels,
            buckets=PART_SECONDS_BUCKETS,
            registry=registry,
        )
        self.active = Gauge(
            "tplr_transfer_active", "Transfers in progress.", labels, registry=registry
        )
        self.integrity_failures = Counter(
            "tplr_transfer_integrity_failures",
            "Parts or objects whose bytes did not match their hash or ETag.",
            labels,
            registry=registry,
        )

    def observe_part(self, direction: str, size_bytes: int, seconds: float) -> None:
        """One completed part: its bytes, its request and its latency."""
        self.bytes.labels(direction).inc(size_bytes)
        self.requests.labels(direction).inc()
        self.part_seconds.labels(direction).observe(seconds)

    def observe_request(self, direction: str) -> None:
        """A request that is not a completed part (a HEAD, a failed attempt)."""
        self.requests.labels(direction).inc()

    def observe_retry(self, direction: str, reason: str) -> None:
        self.retries.labels(direction, reason).inc()

    def observe_integrity_failure(self, direction: str) -> None:
        self.integrity_failures.labels(direction).inc()

    @contextlib.contextmanager
    def track_active(self, direction: str) -> Iterator[None]:
        """``with metrics.track_active("download"):`` counts one transfer in progress."""
        gauge = self.active.labels(direction)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()


_default: TransferMetrics | None = None
_default_lock = threading.Lock()


def default_transfer_metrics() -> TransferMetrics:
    """The process-wide instance on the default registry (created on first call)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TransferMetrics()
        return _default
