from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tplr.errors import ConfigError
from tplr.node.health import HealthConfig, HealthServer, HealthStatus, ProgressTracker
from tplr.node.node_metrics import METRIC_NAMES, NodeMetrics
from tplr.protocol.clock import FakeClock, WindowClock
from tplr.protocol.payload import RejectReason

GENESIS = 1_700_000_000.0


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


async def test_metrics_endpoint_serves_the_node_metrics():
    registry = CollectorRegistry()
    clock = FakeClock(GENESIS)
    metrics = NodeMetrics(role="validator", uid=7, run_id="run-a", registry=registry, clock=clock)
    metrics.mark_progress(42)
    metrics.observe_training(loss=3.25, tokens_per_second=12_500.0, mfu=0.41)
    metrics.inner_step_seconds.observe(0.3)
    metrics.record_upload(seconds=1.5, payload_bytes=123_456)
    metrics.record_gather(seconds=4.0, gathered=5)
    metrics.record_rejection(RejectReason.NON_FINITE)
    metrics.record_rejection("non_finite")
    metrics.record_aggregation(outer_step_norm=0.75, clipped_peers=2)
    metrics.set_scores({3: 0.5, 4: 0.25})
    metrics.set_scores({4: 0.3})  # uid 3 left the board
    metrics.mark_checkpoint()
    clock.advance(90)

    tracker = ProgressTracker(WindowClock(genesis_s=GENESIS, window_seconds=60, clock=clock))
    async with HealthServer(registry=registry, health=tracker.status, port=0) as server:
        assert server.port and server.port > 0
        status, content_type, body = await http_get(server.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    values = samples(body)
    assert values[("tplr_window", ())] == 42
    assert values[("tplr_last_window_progress_timestamp_seconds", ())] == GENESIS
    assert values[("tplr_loss", ())] == 3.25
    assert values[("tplr_mfu_ratio", ())] == 0.41
    assert values[("tplr_tokens_per_second", ())] == 12_500
    assert values[("tplr_inner_step_seconds_count", ())] == 1
    assert values[("tplr_upload_seconds_sum", ())] == 1.5
    assert values[("tplr_payload_bytes", ())] == 123_456
    assert values[("tplr_gather_seconds_count", ())] == 1
    assert values[("tplr_peers_gathered", ())] == 5
    assert values[("tplr_peers_rejected_total", (("reason", "non_finite"),))] == 2
    assert values[("tplr_peers_rejected_total", (("reason", "digest_mismatch"),))] == 0
    assert values[("tplr_outer_step_norm", ())] == 0.75
    assert values[("tplr_aggregation_clipped_peers", ())] == 2
    assert values[("tplr_peer_score", (("uid", "4"),))] == 0.3
    assert ("tplr_peer_score", (("uid", "3"),)) not in values
    assert values[("tplr_checkpoint_age_seconds", ())] == 90
    (info_labels,) = [dict(labels) for name, labels in values if name == "tplr_node_info"]
    assert info_labels["role"] == "validator" and info_labels["uid"] == "7"
    assert info_labels["run_id"] == "run-a"
    families = {family.name for family in text_string_to_metric_families(body)}
    sample_names = {name for name, _ in values}
    for name in METRIC_NAMES:  # what dashboards and alerts may query really exists
        assert name in sample_names or name in families, name


def test_unknown_values_are_nan_not_zero():
    registry = CollectorRegistry()
    metrics = NodeMetrics(role="miner", uid=1, registry=registry, clock=FakeClock())
    assert math.isnan(registry.get_sample_value("tplr_checkpoint_age_seconds"))
    metrics.observe_training(loss=2.0, tokens_per_second=10.0, mfu=None)  # CPU: no MFU
    assert math.isnan(registry.get_sample_value("tplr_mfu_ratio"))
    assert registry.get_sample_value("tplr_loss") == 2.0


async def test_healthz_turns_503_after_stalled_windows_on_the_fake_clock():
    clock = FakeClock(GENESIS + 5)
    windows = WindowClock(genesis_s=GENESIS, window_seconds=60, clock=clock)
    tracker = ProgressTracker(windows, max_stalled_windows=2)
    async with HealthServer(registry=CollectorRegistry(), health=tracker.status) as server:
        status, _, body = await http_get(server.port, "/healthz")
        assert status == 200 and body.startswith("ok: window 0")
        tracker.mark_progress(0)
        clock.advance(120)  # window 2: two windows without progress is still fine
        assert (await http_get(server.port, "/healthz"))[0] == 200
        clock.advance(60)  # window 3
        status, _, body = await http_get(server.port, "/healthz")
        assert status == 503
        assert "no window progress for 3 windows (last in window 0; now window 3; limit 2)" in body
        tracker.mark_progress(2)
        tracker.mark_progress(1)  # going backwards does not count
        status, _, body = await http_get(server.port, "/healthz?verbose=1")
        assert status == 200 and "last in window 2" in body


async def test_a_node_that_never_progresses_turns_unhealthy():
    clock = FakeClock(GENESIS + 600)
    tracker = ProgressTracker(
        WindowClock(genesis_s=GENESIS, window_seconds=60, clock=clock), max_stalled_windows=1
    )
    assert tracker.status().healthy
    clock.advance(120)
    status = tracker.status()
    assert not status.healthy and "none since start in window 10" in status.detail
    with pytest.raises(ConfigError, match="max_stalled_windows"):
        ProgressTracker(WindowClock(genesis_s=0, window_seconds=1), max_stalled_windows=0)


async def test_other_paths_methods_and_garbage():
    ok = HealthStatus(True, "fine")
    server = HealthServer(registry=CollectorRegistry(), health=lambda: ok, request_timeout_s=30)
    async with server:
        assert (await http_get(server.port, "/nope"))[0] == 404
        assert (await http_get(server.port, "/metrics", method="POST"))[0] == 405
        status, _, body = await http_get(server.port, "/healthz", method="HEAD")
        assert status == 200 and body == ""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NONSENSE\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        writer.close()
        assert response.startswith(b"HTTP/1.1 400 Bad Request")
        # a client that connects and says nothing blocks neither others nor shutdown
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert (await http_get(server.port, "/healthz"))[0] == 200
    assert await asyncio.wait_for(idle_reader.read(), timeout=2) == b""
    idle_writer.close()


async def test_busy_port_is_a_clear_config_error():
    registry = CollectorRegistry()
    ok = HealthStatus(True, "fine")
    async with HealthServer(registry=registry, health=lambda: ok) as first:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{first.port}") as info:
            async with HealthServer(registry=registry, health=lambda: ok, port=first.port):
                pass
        assert "METRICS_PORT" in info.value.hint


def test_health_config_from_env(monkeypatch):
    monkeypatch.delenv("HEALTH_MAX_STALLED_WINDOWS", raising=False)
    config = HealthConfig.load()
    assert (config.metrics_port, config.health_max_stalled_windows) == (9108, 3)
    monkeypatch.setenv("METRICS_PORT", "9200")
    monkeypatch.setenv("HEALTH_MAX_STALLED_WINDOWS", "5")
    config = HealthConfig.load()
    assert (config.metrics_port, config.health_max_stalled_windows) == (9200, 5)
    monkeypatch.setenv("METRICS_PORT", "70000")
    with pytest.raises(ConfigError, match="invalid METRICS_PORT") as info:
        HealthConfig.load()
    assert "0-65535" in info.value.hint
    monkeypatch.setenv("METRICS_PORT", "0")
    monkeypatch.setenv("HEALTH_MAX_STALLED_WINDOWS", "0")
    with pytest.raises(ConfigError, match="invalid HEALTH_MAX_STALLED_WINDOWS"):
        HealthConfig.load()
