from __future__ import annotations

import asyncio
import http.client
import math
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tplr import __version__
from tplr.errors import ConfigError
from tplr.node.process.gpu_metrics import GpuReading
from tplr.node.process.health import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    HealthConfig,
    HealthServer,
    HealthStatus,
    NodeHealth,
    ProgressTracker,
)
from tplr.node.process.metrics import METRIC_NAMES, NodeMetrics, NodeState, PeerOutcome
from tplr.protocol.clock import FakeClock, WindowClock
from tplr.protocol.reasons import RejectReason

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
    metrics.record_aggregation(outer_step_norm=0.75, approved_peers=2)
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
    assert values[("tplr_aggregation_approved_peers", ())] == 2
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


UNLABELLED_GAUGES = (
    "tplr_window",
    "tplr_loss",
    "tplr_validation_loss",
    "tplr_tokens_per_second",
    "tplr_mfu_ratio",
    "tplr_payload_bytes",
    "tplr_peers_gathered",
    "tplr_outer_step_norm",
    "tplr_aggregation_approved_peers",
    "tplr_checkpoint_age_seconds",
    "tplr_last_window_progress_timestamp_seconds",
    "tplr_run_window_seconds",
    "tplr_peer_outcome_window",
)


def test_gauges_without_a_value_are_absent_not_zero():
    """A restarted node exports no placeholder 0 (TplrLossRising, zero lines on dashboards)."""
    registry = CollectorRegistry()
    metrics = NodeMetrics(role="miner", uid=1, registry=registry, clock=FakeClock())
    values = samples(generate_latest(registry).decode())
    present = {name for name, _ in values}
    assert not present & set(UNLABELLED_GAUGES), present & set(UNLABELLED_GAUGES)
    assert values[("tplr_node_state", (("state", "starting"),))] == 1
    assert sum(v for (name, _), v in values.items() if name == "tplr_node_state") == 1
    metrics.observe_training(loss=2.0, tokens_per_second=10.0, mfu=None)  # CPU: no MFU
    metrics.observe_training(loss=2.5, tokens_per_second=10.0, mfu=math.nan)
    assert registry.get_sample_value("tplr_mfu_ratio") is None
    assert registry.get_sample_value("tplr_loss") == 2.5
    metrics.record_validation_loss(None)
    assert registry.get_sample_value("tplr_validation_loss") is None
    metrics.set_run("run-b", window_seconds=360)
    assert registry.get_sample_value("tplr_run_window_seconds") == 360
    info = registry.get_sample_value(
        "tplr_node_info", {"role": "miner", "uid": "1", "run_id": "run-b", "version": __version__}
    )
    assert info == 1


def test_peer_outcomes_replace_the_previous_window():
    registry = CollectorRegistry()
    metrics = NodeMetrics(role="validator", uid=0, registry=registry, clock=FakeClock())
    metrics.set_peer_outcomes(
        5,
        {
            1: PeerOutcome(on_time=True, approved=True, gate_passed=True, reward=0.25),
            2: PeerOutcome(on_time=False, approved=False, gate_passed=None, reward=0.0),
        },
    )

    def value(name: str, uid: int) -> float | None:
        return registry.get_sample_value(name, {"uid": str(uid)})

    assert (value("tplr_peer_on_time", 1), value("tplr_peer_approved", 1)) == (1, 1)
    assert (value("tplr_peer_gate_passed", 1), value("tplr_peer_reward", 1)) == (1, 0.25)
    assert value("tplr_peer_on_time", 2) == 0 and value("tplr_peer_gate_passed", 2) is None
    assert registry.get_sample_value("tplr_peer_outcome_window") == 5
    metrics.set_peer_outcomes(
        6, {2: PeerOutcome(on_time=True, approved=False, gate_passed=False, reward=0.0)}
    )
    for name in ("tplr_peer_on_time", "tplr_peer_approved", "tplr_peer_reward"):
        assert value(name, 1) is None, f"{name}: uid 1 left the window"
    assert value("tplr_peer_gate_passed", 2) == 0 and value("tplr_peer_on_time", 2) == 1


def test_gpu_gauges_come_from_the_probe_and_are_absent_without_cuda():
    registry = CollectorRegistry()
    NodeMetrics(role="miner", uid=1, registry=registry, clock=FakeClock())  # torch.cuda probe
    text = generate_latest(registry).decode()
    assert "# TYPE tplr_gpu_memory_used_bytes gauge" in text
    assert not [name for name, _ in samples(text) if name.startswith("tplr_gpu_")]
    reading = GpuReading(0, "H100", 80e9, 20e9, memory_allocated_bytes=15e9)
    registry = CollectorRegistry()
    NodeMetrics(role="miner", uid=1, registry=registry, gpu_probe=lambda: [reading])
    labels = {"gpu": "0", "name": "H100"}
    assert registry.get_sample_value("tplr_gpu_memory_used_bytes", labels) == 20e9
    assert registry.get_sample_value("tplr_gpu_memory_allocated_bytes", labels) == 15e9
    assert registry.get_sample_value("tplr_gpu_utilization_ratio", labels) is None

    def broken() -> list[GpuReading]:
        raise RuntimeError("driver gone")

    registry = CollectorRegistry()
    NodeMetrics(role="miner", uid=1, registry=registry, gpu_probe=broken)
    assert "tplr_window" in generate_latest(registry).decode()  # /metrics still answers


async def test_healthz_reports_the_startup_phase_then_window_progress():
    registry = CollectorRegistry()
    clock = FakeClock(GENESIS)
    metrics = NodeMetrics(role="miner", uid=1, registry=registry, clock=clock)
    health = NodeHealth(metrics)
    async with HealthServer(registry=registry, health=health.status) as server:
        health.phase(NodeState.STARTING, "waiting for run.json at file:///x/run.json")
        status, _, body = await http_get(server.port, "/healthz")
        assert (status, body) == (200, "ok: starting: waiting for run.json at file:///x/run.json\n")
        health.phase(NodeState.DOWNLOADING, "the dataset shard of window 0")
        assert registry.get_sample_value("tplr_node_state", {"state": "downloading"}) == 1
        tracker = ProgressTracker(
            WindowClock(genesis_s=GENESIS, window_seconds=60, clock=clock), max_stalled_windows=1
        )
        health.track(tracker, NodeState.TRAINING)
        assert registry.get_sample_value("tplr_node_state", {"state": "training"}) == 1
        assert (await http_get(server.port, "/healthz"))[0] == 200
        clock.advance(121)
        status, _, body = await http_get(server.port, "/healthz")
        assert status == 503 and "no window progress for 2 windows" in body
        assert registry.get_sample_value("tplr_node_state", {"state": "stalled"}) == 1
        assert registry.get_sample_value("tplr_node_state", {"state": "training"}) == 0


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
    assert config.metrics_host == "127.0.0.1", "outside the image, loopback only"
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


# -- a flood of idle connections (hostile input, issue 10 item 6) ------------------------------
IDLE_SOCKETS = 1_100
SERVER_NOFILE = 512  # the node's descriptor limit in the subprocess: below the flood


def idle_flood(port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open up to ``count`` idle connections; stop after a few refused/stalled connects."""
    opened: list[socket.socket] = []
    failures = 0
    while len(opened) < count and failures < 3:
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            failures += 1
    return opened, failures


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def healthz_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status
    except (OSError, http.client.HTTPException):
        return None


def test_a_flood_of_idle_sockets_neither_starves_the_node_nor_its_file_opens():
    """1,100 idle connections against a node limited to 512 descriptors: the excess is
    closed at once, the node's own file opens still work and /healthz still answers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_SOCKETS + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_SOCKETS + 512), hard))
    command = [sys.executable, str(Path(__file__).with_name("health_server_proc.py"))]
    server = subprocess.Popen(
        [*command, str(SERVER_NOFILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    sockets: list[socket.socket] = []
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline().split()[1])
        sockets, failed_connects = idle_flood(port, IDLE_SOCKETS)
        server.stdin.write("open 64\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "opened 64", "the node ran out of descriptors"
        assert failed_connects == 0 and len(sockets) == IDLE_SOCKETS
        time.sleep(0.5)
        closed = sum(closed_by_peer(sock) for sock in sockets)
        assert closed >= IDLE_SOCKETS - DEFAULT_MAX_CONNECTIONS, closed
        deadline = time.monotonic() + DEFAULT_HEADER_TIMEOUT_S + 10
        while healthz_status(port) != 200:
            assert time.monotonic() < deadline, "/healthz did not answer during the flood"
            time.sleep(0.2)
    finally:
        for sock in sockets:
            sock.close()
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)


async def test_connections_beyond_the_cap_are_closed_at_once_and_idle_ones_time_out():
    ok = HealthStatus(True, "fine")
    server = HealthServer(
        registry=CollectorRegistry(), health=lambda: ok, max_connections=4, header_timeout_s=0.5
    )
    async with server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
        outcomes = []
        for reader, _ in idle:  # held ones end at the header deadline, the rest at once
            started = time.monotonic()
            try:
                data = await asyncio.wait_for(reader.read(), timeout=5)
            except ConnectionError:
                data = b""
            outcomes.append((data, time.monotonic() - started))
        assert all(data == b"" for data, _ in outcomes)
        assert server.refused_connections == 6
        assert (await http_get(server.port, "/healthz"))[0] == 200
        for _, writer in idle:
            writer.close()


def test_metric_names_list_every_family_the_node_exports():
    registry = CollectorRegistry()
    NodeMetrics(role="miner", uid=1, registry=registry, clock=FakeClock())
    suffix = {"info": "_info", "counter": "_total"}
    exported = {f.name + suffix.get(f.type, "") for f in registry.collect()}
    assert exported == set(METRIC_NAMES), set(METRIC_NAMES) ^ exported


def test_auto_device_without_a_gpu_says_so_loudly(caplog):
    from tplr.node.runtime import resolve_node_device

    with caplog.at_level("WARNING", logger="tplr.node.runtime"):
        assert resolve_node_device("auto").type == "cpu"  # this host has no usable GPU
    assert "TRAINING ON THE CPU" in caplog.text and "TPLR_DEVICE=cuda" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tplr.node.runtime"):
        resolve_node_device("cpu")
    assert not caplog.text, "an explicit cpu is not a fallback"
