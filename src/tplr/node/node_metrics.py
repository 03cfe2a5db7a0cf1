"""Prometheus metrics of a miner or validator node (registry injectable, names ``tplr_*``).

Role, uid, run id and code version are labels of one info metric (``tplr_node_info``),
not of every series; per-peer values carry a ``uid`` label, rejections a ``reason``.
``tplr_checkpoint_age_seconds`` is computed at scrape time from the injected clock
(NaN until the first checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

from tplr import __version__
from tplr.protocol.clock import Clock, SystemClock
from tplr.protocol.reasons import RejectReason

_STEP_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_TRANSFER_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

METRIC_NAMES = (
    "tplr_node_info",
    "tplr_window",
    "tplr_loss",
    "tplr_tokens_per_second",
    "tplr_mfu_ratio",
    "tplr_inner_step_seconds",
    "tplr_upload_seconds",
    "tplr_gather_seconds",
    "tplr_payload_bytes",
    "tplr_peers_gathered",
    "tplr_peers_rejected_total",
    "tplr_outer_step_norm",
    "tplr_aggregation_clipped_peers",
    "tplr_peer_score",
    "tplr_checkpoint_age_seconds",
    "tplr_last_window_progress_timestamp_seconds",
)
"""Every series family this class exports (dashboards and alert rules may rely on them)."""


class NodeMetrics:
    """All node-level metrics. One instance per process; tests pass a fresh registry."""

    def __init__(
        self,
        *,
        role: str,
        uid: int,
        run_id: str = "",
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        registry = registry if registry is not None else REGISTRY
        self._clock = clock or SystemClock()
        self._last_checkpoint_s: float | None = None
        self._scored_uids: set[int] = set()
        self.info = Info("tplr_node", "Identity of this node.", registry=registry)
        self.info.info({"role": role, "uid": str(uid), "run_id": run_id, "version": __version__})
        self._create_training_metrics(registry)
        self._create_exchange_metrics(registry)
        self._create_state_metrics(registry)

    def _create_training_metrics(self, registry: CollectorRegistry) -> None:
        self.loss = Gauge("tplr_loss", "Mean training loss of the last window.", registry=registry)
        self.tokens_per_second = Gauge(
            "tplr_tokens_per_second", "Training throughput (tokens/s).", registry=registry
        )
        self.mfu = Gauge("tplr_mfu_ratio", "Model FLOPs utilisation, 0 to 1.", registry=registry)
        self.mfu.set(math.nan)  # unknown until measured (CPU, unknown GPU)
        self.inner_step_seconds = Histogram(
            "tplr_inner_step_seconds",
            "Duration of one inner optimizer step.",
            buckets=_STEP_BUCKETS_S,
            registry=registry,
        )

    def _create_exchange_metrics(self, registry: CollectorRegistry) -> None:
        self.upload_seconds = Histogram(
            "tplr_upload_seconds",
            "Duration of the gradient payload upload.",
            buckets=_TRANSFER_BUCKETS_S,
            registry=registry,
        )
        self.gather_seconds = Histogram(
            "tplr_gather_seconds",
            "Duration of gathering the peers' payloads for one window.",
            buckets=_TRANSFER_BUCKETS_S,
            registry=registry,
        )
        self.payload_bytes = Gauge(
            "tplr_payload_bytes", "Size of the last uploaded payload.", registry=registry
        )
        self.peers_gathered = Gauge(
            "tplr_peers_gathered", "Valid peer payloads in the last window.", registry=registry
        )
        self.peers_rejected = Counter(
            "tplr_peers_rejected",
            "Peer payloads rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in RejectReason:  # every reason exported from the start (rate() works)
            self.peers_rejected.labels(reason=reason.value)

    def _create_state_metrics(self, registry: CollectorRegistry) -> None:
        self.window = Gauge("tplr_window", "Last window the node completed.", registry=registry)
        self.outer_step_norm = Gauge(
            "tplr_outer_step_norm", "L2 norm of the last aggregated outer step.", registry=registry
        )
        self.clipped_peers = Gauge(
            "tplr_aggregation_clipped_peers",
            "Peers clipped to the median norm in the last aggregation.",
            registry=registry,
        )
        self.peer_score = Gauge(
            "tplr_peer_score", "Moving-average score per miner uid.", ["uid"], registry=registry
        )
        self.checkpoint_age_seconds = Gauge(
            "tplr_checkpoint_age_seconds",
            "Seconds since the last checkpoint was saved or loaded (NaN before the first).",
            registry=registry,
        )
        self.checkpoint_age_seconds.set_function(self._checkpoint_age_s)
        self.last_progress_timestamp = Gauge(
            "tplr_last_window_progress_timestamp_seconds",
            "Unix time at which the node last completed a window.",
            registry=registry,
        )

    def _checkpoint_age_s(self) -> float:
        if self._last_checkpoint_s is None:
            return math.nan
        return max(0.0, self._clock.now() - self._last_checkpoint_s)

    def mark_progress(self, window: int) -> None:
        """The node completed ``window``."""
        self.window.set(window)
        self.last_progress_timestamp.set(self._clock.now())

    def observe_training(
        self, *, loss: float, tokens_per_second: float, mfu: float | None = None
    ) -> None:
        """From the worker's TrainStats; ``mfu`` is None off CUDA (the gauge keeps NaN)."""
        self.loss.set(loss)
        self.tokens_per_second.set(tokens_per_second)
        if mfu is not None:
            self.mfu.set(mfu)

    def record_upload(self, *, seconds: float, payload_bytes: int) -> None:
        self.upload_seconds.observe(seconds)
        self.payload_bytes.set(payload_bytes)

    def record_gather(self, *, seconds: float, gathered: int) -> None:
        self.gather_seconds.observe(seconds)
        self.peers_gathered.set(gathered)

    def record_rejection(self, reason: RejectReason | str) -> None:
        self.peers_rejected.labels(reason=str(reason)).inc()

    def record_aggregation(self, *, outer_step_norm: float, clipped_peers: int) -> None:
        self.outer_step_norm.set(outer_step_norm)
        self.clipped_peers.set(clipped_peers)

    def set_scores(self, scores: Mapping[int, float]) -> None:
        """Replace the per-uid scores (uids no longer scored disappear)."""
        for uid in self._scored_uids - set(scores):
            self.peer_score.remove(str(uid))
        for uid, score in scores.items():
            self.peer_score.labels(uid=str(uid)).set(score)
        self._scored_uids = set(scores)

    def mark_checkpoint(self, timestamp_s: float | None = None) -> None:
        """A checkpoint was saved or loaded at ``timestamp_s`` (default: now)."""
        self._last_checkpoint_s = self._clock.now() if timestamp_s is None else timestamp_s
