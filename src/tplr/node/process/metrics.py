"""Prometheus metrics of a miner or validator node (registry injectable, names ``tplr_*``).

Role, uid, run id and code version are labels of one info metric (``tplr_node_info``),
not of every series; per-peer values carry a ``uid`` label, rejections a ``reason``.

A gauge without a value is **absent**, never a placeholder 0: ``tplr_loss`` appears once a
miner has trained, ``tplr_validation_loss`` once the lead has measured, ``tplr_window``
once a window is done, and so on (``absent()`` and ``or`` in PromQL work as meant; a
restart does not plot a zero). ``tplr_node_state`` is one-hot over :class:`NodeState`
and is read at scrape time from the node's health. GPU gauges come from ``torch.cuda``
(and NVML when ``pynvml`` is importable); a host without CUDA exports none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tplr import __version__
from tplr.node.process.gpu_metrics import GpuCollector, GpuProbe
from tplr.node.process.state import NodeState
from tplr.optional_gauge import OptionalGauge
from tplr.protocol.clock import Clock, SystemClock
from tplr.protocol.reasons import RejectReason

__all__ = ["METRIC_NAMES", "NodeMetrics", "NodeState", "OptionalGauge", "PeerOutcome"]

_STEP_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_TRANSFER_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


METRIC_NAMES = (
    "tplr_node_info",
    "tplr_node_state",
    "tplr_run_window_seconds",
    "tplr_run_checkpoint_every_windows",
    "tplr_window",
    "tplr_windows_completed_total",
    "tplr_loss",
    "tplr_validation_loss",
    "tplr_tokens_per_second",
    "tplr_mfu_ratio",
    "tplr_inner_step_seconds",
    "tplr_upload_seconds",
    "tplr_gather_seconds",
    "tplr_payload_bytes",
    "tplr_last_upload_timestamp_seconds",
    "tplr_peers_gathered",
    "tplr_peers_rejected_total",
    "tplr_outer_step_norm",
    "tplr_aggregation_approved_peers",
    "tplr_peer_score",
    "tplr_scores_published_timestamp_seconds",
    "tplr_peer_on_time",
    "tplr_peer_approved",
    "tplr_peer_gate_passed",
    "tplr_peer_reward",
    "tplr_peer_outcome_window",
    "tplr_checkpoint_age_seconds",
    "tplr_last_window_progress_timestamp_seconds",
    *GpuCollector.NAMES,
)
"""Every series family this class exports (dashboards and alert rules may rely on them)."""


@dataclass(frozen=True, slots=True)
class PeerOutcome:
    """How one miner fared in one window, as the validator saw it."""

    on_time: bool  # its payload was there and uploaded inside the window
    approved: bool  # its payload went into this window's aggregate
    gate_passed: bool | None  # it passed the score gate (None: not evaluated)
    reward: float  # what it earned this window


class _StateCollector(Collector):
    """``tplr_node_state{state}``: 1 for the current state, 0 for the others."""

    NAME = "tplr_node_state"
    HELP = "What the node is doing now (one-hot over the states)."

    def __init__(self, source: Callable[[], NodeState], registry: CollectorRegistry) -> None:
        self.source = source
        registry.register(self)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])
        current = self.source()
        for state in NodeState:
            family.add_metric([state.value], 1.0 if state is current else 0.0)
        yield family


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
        gpu_probe: GpuProbe | None = None,
    ) -> None:
        registry = registry if registry is not None else REGISTRY
        self._clock = clock or SystemClock()
        self._role, self._uid = role, uid
        self._last_checkpoint_s: float | None = None
        self._scored_uids: set[int] = set()
        self._outcome_uids: set[str] = set()
        self._state = NodeState.STARTING
        self.info = Info("tplr_node", "Identity of this node.", registry=registry)
        self.set_run(run_id)
        self.state = _StateCollector(lambda: self._state, registry)
        self.run_window_seconds = OptionalGauge(
            "tplr_run_window_seconds", "window_seconds of the run (from run.json).", registry
        )
        self.run_checkpoint_every_windows = OptionalGauge(
            "tplr_run_checkpoint_every_windows",
            "checkpoint_every_windows of the run (from run.json).",
            registry,
        )
        self._create_training_metrics(registry)
        self._create_exchange_metrics(registry)
        self._create_state_metrics(registry)
        self._create_peer_metrics(registry)
        self.gpu = GpuCollector(registry, probe=gpu_probe)

    def _create_training_metrics(self, registry: CollectorRegistry) -> None:
        self.loss = OptionalGauge("tplr_loss", "Mean training loss of the last window.", registry)
        self.validation_loss = OptionalGauge(
            "tplr_validation_loss",
            "Loss of the global model on the held-out shard (lead validator).",
            registry,
        )
        self.tokens_per_second = OptionalGauge(
            "tplr_tokens_per_second", "Training throughput (tokens/s).", registry
        )
        self.mfu = OptionalGauge(
            "tplr_mfu_ratio", "Model FLOPs utilisation, 0 to 1 (absent off CUDA).", registry
        )
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
        self.payload_bytes = OptionalGauge(
            "tplr_payload_bytes", "Size of the last uploaded payload.", registry
        )
        self.last_upload_timestamp = OptionalGauge(
            "tplr_last_upload_timestamp_seconds",
            "Unix time of the last gradient payload upload (miners).",
            registry,
        )
        self.peers_gathered = OptionalGauge(
            "tplr_peers_gathered", "Valid peer payloads in the last window.", registry
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
        self.window = OptionalGauge("tplr_window", "Last window the node completed.", registry)
        self.windows_completed = Counter(
            "tplr_windows_completed",
            "Windows completed since the process started.",
            registry=registry,
        )
        self.outer_step_norm = OptionalGauge(
            "tplr_outer_step_norm", "L2 norm of the last aggregated outer step.", registry
        )
        self.approved_peers = OptionalGauge(
            "tplr_aggregation_approved_peers",
            "Payloads in the last outer step (the lead's approved set; 0 is a null round).",
            registry,
        )
        self.checkpoint_age_seconds = OptionalGauge(
            "tplr_checkpoint_age_seconds",
            "Seconds since the last checkpoint was saved or loaded (absent before the first).",
            registry,
        )
        self.checkpoint_age_seconds.set_function(self._checkpoint_age_s)
        self.last_progress_timestamp = OptionalGauge(
            "tplr_last_window_progress_timestamp_seconds",
            "Unix time at which the node last completed a window.",
            registry,
        )

    def _create_peer_metrics(self, registry: CollectorRegistry) -> None:
        def per_uid(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, ["uid"], registry=registry)

        self.peer_score = per_uid("tplr_peer_score", "Moving-average score per miner uid.")
        self.scores_published_timestamp = OptionalGauge(
            "tplr_scores_published_timestamp_seconds",
            "Unix time at which the validator last published its scores.",
            registry,
        )
        self.peer_on_time = per_uid(
            "tplr_peer_on_time", "1 if the miner's payload arrived inside the last window."
        )
        self.peer_approved = per_uid(
            "tplr_peer_approved", "1 if the miner's payload was aggregated in the last window."
        )
        self.peer_gate_passed = per_uid(
            "tplr_peer_gate_passed", "1 if the miner passed the score gate (absent: not judged)."
        )
        self.peer_reward = per_uid("tplr_peer_reward", "The miner's reward for the last window.")
        self.peer_outcome_window = OptionalGauge(
            "tplr_peer_outcome_window", "Window of the tplr_peer_* outcomes.", registry
        )

    def _checkpoint_age_s(self) -> float | None:
        if self._last_checkpoint_s is None:
            return None
        return max(0.0, self._clock.now() - self._last_checkpoint_s)

    # -- identity and state ----------------------------------------------------------------
    def set_run(
        self,
        run_id: str,
        *,
        window_seconds: float | None = None,
        checkpoint_every_windows: int | None = None,
    ) -> None:
        """The run this node joined (``run_id`` is empty until then); alert rules derive
        their durations from the window length."""
        self.info.info(
            {"role": self._role, "uid": str(self._uid), "run_id": run_id, "version": __version__}
        )
        if window_seconds is not None:
            self.run_window_seconds.set(window_seconds)
        if checkpoint_every_windows is not None:
            self.run_checkpoint_every_windows.set(checkpoint_every_windows)

    def set_state(self, state: NodeState) -> None:
        self._state = state

    def read_state_from(self, source: Callable[[], NodeState]) -> None:
        """Read ``tplr_node_state`` from ``source`` at scrape time (the node's health)."""
        self.state.source = source

    # -- updates ---------------------------------------------------------------------------
    def mark_progress(self, window: int) -> None:
        """The node completed ``window``."""
        self.window.set(window)
        self.windows_completed.inc()
        self.last_progress_timestamp.set(self._clock.now())

    def observe_training(
        self, *, loss: float, tokens_per_second: float, mfu: float | None = None
    ) -> None:
        """From the worker's TrainStats; ``mfu`` None or NaN (off CUDA) leaves it absent."""
        self.loss.set(loss)  # a NaN loss is exported as NaN (TplrLossNotFinite)
        self.tokens_per_second.set(tokens_per_second)
        if mfu is not None and not math.isnan(mfu):
            self.mfu.set(mfu)

    def record_validation_loss(self, loss: float | None) -> None:
        if loss is not None:
            self.validation_loss.set(loss)

    def record_upload(self, *, seconds: float, payload_bytes: int) -> None:
        self.upload_seconds.observe(seconds)
        self.payload_bytes.set(payload_bytes)
        self.last_upload_timestamp.set(self._clock.now())

    def record_gather(self, *, seconds: float, gathered: int) -> None:
        self.gather_seconds.observe(seconds)
        self.peers_gathered.set(gathered)

    def record_rejection(self, reason: RejectReason | str) -> None:
        self.peers_rejected.labels(reason=str(reason)).inc()

    def record_aggregation(self, *, outer_step_norm: float, approved_peers: int) -> None:
        self.outer_step_norm.set(outer_step_norm)
        self.approved_peers.set(approved_peers)

    def set_scores(self, scores: Mapping[int, float]) -> None:
        """Replace the per-uid scores (uids no longer scored disappear)."""
        for uid in self._scored_uids - set(scores):
            self.peer_score.remove(str(uid))
        for uid, score in scores.items():
            self.peer_score.labels(uid=str(uid)).set(score)
        self._scored_uids = set(scores)
        self.scores_published_timestamp.set(self._clock.now())

    def set_peer_outcomes(self, window: int, outcomes: Mapping[int, PeerOutcome]) -> None:
        """Replace the per-uid outcomes of ``window`` (uids not in ``outcomes`` disappear)."""
        current = {str(uid) for uid in outcomes}
        gauges = (self.peer_on_time, self.peer_approved, self.peer_gate_passed, self.peer_reward)
        for uid in self._outcome_uids - current:
            for gauge in gauges:
                _remove_label(gauge, uid)
        for uid, outcome in outcomes.items():
            label = str(uid)
            self.peer_on_time.labels(uid=label).set(float(outcome.on_time))
            self.peer_approved.labels(uid=label).set(float(outcome.approved))
            if outcome.gate_passed is None:
                _remove_label(self.peer_gate_passed, label)
            else:
                self.peer_gate_passed.labels(uid=label).set(float(outcome.gate_passed))
            self.peer_reward.labels(uid=label).set(outcome.reward)
        self._outcome_uids = current
        self.peer_outcome_window.set(window)

    def mark_checkpoint(self, timestamp_s: float | None = None) -> None:
        """A checkpoint was saved or loaded at ``timestamp_s`` (default: now)."""
        self._last_checkpoint_s = self._clock.now() if timestamp_s is None else timestamp_s


def _remove_label(gauge: Gauge, uid: str) -> None:
    try:
        gauge.remove(uid)
    except KeyError:  # never set for this uid
        pass
