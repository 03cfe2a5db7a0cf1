"""``/metrics`` and ``/healthz`` over HTTP on ``METRICS_PORT``, served from process start.

A tiny HTTP/1.1 responder on ``asyncio.start_server`` (one request per connection,
``Connection: close``): ``GET /metrics`` returns the Prometheus text format of the
injected registry, ``GET /healthz`` returns 200 while the node starts up
(``starting: waiting for run.json at ...``) and while it makes window progress, and 503
with the reason once it has made none for more than ``max_stalled_windows`` windows
(:class:`NodeHealth`). Use as ``async with HealthServer(...) as server``; port 0 picks a
free port (``server.port``).

The server is exposed to whoever can reach the port, so it holds at most
``max_connections`` connections (any beyond are closed at once, before a byte is read),
gives a client ``header_timeout_s`` to send its request line and headers, and binds
``127.0.0.1`` unless ``METRICS_HOST`` says otherwise (the Docker image sets ``0.0.0.0``
so that Prometheus can scrape it over the compose network).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tplr.errors import ConfigError
from tplr.node.process.state import NodeState
from tplr.protocol.clock import WindowClock

log = logging.getLogger(__name__)

_MAX_REQUEST_LINE_BYTES = 8 * 1024
_MAX_HEADER_LINES = 100
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HEADER_TIMEOUT_S = 5.0
# asyncio accepts up to the backlog in one burst before any connection can be closed, so
# the descriptors held under a flood are at most max_connections + backlog: keep it small.
_LISTEN_BACKLOG = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"
_TEXT = "text/plain; charset=utf-8"
_ENV_NAMES = {
    "metrics_host": "METRICS_HOST",
    "metrics_port": "METRICS_PORT",
    "health_max_stalled_windows": "HEALTH_MAX_STALLED_WINDOWS",
    "metrics_max_connections": "METRICS_MAX_CONNECTIONS",
}


class HealthConfig(BaseSettings):
    """``METRICS_HOST``, ``METRICS_PORT``, ``METRICS_MAX_CONNECTIONS`` and
    ``HEALTH_MAX_STALLED_WINDOWS``."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the /metrics and /healthz server binds (the image sets 0.0.0.0)",
    )
    metrics_port: int = Field(
        default=9108, ge=0, le=65535, description="port of /metrics and /healthz (0: any free)"
    )
    health_max_stalled_windows: int = Field(
        default=3,
        ge=1,
        le=10_000,
        description="/healthz turns 503 after this many windows without progress",
    )
    metrics_max_connections: int = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        ge=1,
        le=4096,
        description="connections the health server holds at once; more are closed at once",
    )

    @classmethod
    def load(cls, **overrides: Any) -> HealthConfig:
        """Read the environment (overrides win); errors name the env var and the range."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else ""
            name = _ENV_NAMES.get(field, field.upper())
            raise ConfigError(
                f"invalid {name}: {error['msg']}",
                hint="METRICS_PORT must be 0-65535 (0 picks a free port); "
                "HEALTH_MAX_STALLED_WINDOWS must be 1-10000; METRICS_MAX_CONNECTIONS 1-4096",
            ) from None


@dataclass(frozen=True, slots=True)
class HealthStatus:
    healthy: bool
    detail: str
    state: NodeState | None = None


class ProgressTracker:
    """Healthy while the node completes windows; unhealthy after too many without progress."""

    def __init__(self, window_clock: WindowClock, *, max_stalled_windows: int = 3) -> None:
        if max_stalled_windows < 1:
            raise ConfigError(
                f"max_stalled_windows must be >= 1, got {max_stalled_windows}",
                hint="set HEALTH_MAX_STALLED_WINDOWS to 1 or more",
            )
        self._windows = window_clock
        self.max_stalled_windows = max_stalled_windows
        self.started_window = window_clock.current_window()
        self.last_progress_window: int | None = None

    def mark_progress(self, window: int) -> None:
        """The node finished its work for ``window``."""
        if self.last_progress_window is None or window > self.last_progress_window:
            self.last_progress_window = window

    def status(self) -> HealthStatus:
        current = self._windows.current_window()
        if self.last_progress_window is None:
            since, what = self.started_window, f"none since start in window {self.started_window}"
        else:
            since, what = self.last_progress_window, f"last in window {self.last_progress_window}"
        stalled = current - since
        if stalled > self.max_stalled_windows:
            return HealthStatus(
                False,
                f"no window progress for {stalled} windows ({what}; now window {current}; "
                f"limit {self.max_stalled_windows})",
            )
        return HealthStatus(True, f"window {current}, progress {what}")


class _StateSink(Protocol):
    def read_state_from(self, source: Callable[[], NodeState]) -> None: ...


class NodeHealth:
    """The node's health from process start: a start-up phase, then window progress.

    While starting, ``/healthz`` answers 200 ``<state>: <what it waits for>`` (a long first
    shard download is a normal start, not a failure); once :meth:`track` hands it the
    :class:`ProgressTracker`, it answers as the tracker says. ``tplr_node_state`` follows
    :meth:`state` (``stalled`` while the tracker is unhealthy).
    """

    def __init__(self, metrics: _StateSink | None = None) -> None:
        self._state = NodeState.STARTING
        self._detail = "opening the stores"
        self._tracker: ProgressTracker | None = None
        if metrics is not None:
            metrics.read_state_from(self.state)

    def phase(self, state: NodeState, detail: str) -> None:
        """A start-up step: ``state`` (starting, joining, downloading) and what it waits for."""
        self._state, self._detail = state, detail
        log.info("%s: %s", state.value, detail)

    def track(self, tracker: ProgressTracker, working_state: NodeState) -> None:
        """Start-up is over: health follows window progress from now on."""
        self._tracker, self._state, self._detail = tracker, working_state, "in the window loop"

    def state(self) -> NodeState:
        if self._tracker is not None and not self._tracker.status().healthy:
            return NodeState.STALLED
        return self._state

    def status(self) -> HealthStatus:
        if self._tracker is None:
            return HealthStatus(True, f"{self._state.value}: {self._detail}", self._state)
        status = self._tracker.status()
        return HealthStatus(status.healthy, status.detail, self.state())


class HealthServer:
    """Serves ``/metrics`` from ``registry`` and ``/healthz`` from ``health()``."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        health: Callable[[], HealthStatus],
        host: str = "127.0.0.1",
        port: int = 0,
        request_timeout_s: float = 10.0,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._registry = registry
        self._health = health
        self._host = host
        self._requested_port = port
        self._request_timeout_s = request_timeout_s
        self._header_timeout_s = min(header_timeout_s, request_timeout_s)
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._open_writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        self.refused_connections = 0
        self.port: int | None = None

    @classmethod
    def from_config(
        cls,
        config: HealthConfig,
        *,
        registry: CollectorRegistry,
        health: Callable[[], HealthStatus],
    ) -> HealthServer:
        return cls(
            registry=registry,
            health=health,
            host=config.metrics_host,
            port=config.metrics_port,
            max_connections=config.metrics_max_connections,
        )

    async def __aenter__(self) -> HealthServer:
        try:
            self._server = await asyncio.start_server(
                self._serve,
                self._host,
                self._requested_port,
                limit=_MAX_REQUEST_LINE_BYTES,
                backlog=_LISTEN_BACKLOG,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self._host}:{self._requested_port}: {exc.strerror or exc}",
                hint="choose a free METRICS_PORT (or 0 for any free port)",
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving /metrics and /healthz on http://%s:%d", self._host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for writer in list(self._open_writers):  # idle clients must not delay shutdown
                writer.close()
            if self._handlers:  # they end on the closed connection (never cancelled: 3.11
                await asyncio.wait(self._handlers, timeout=5)  # logs cancelled handlers)
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open_writers) >= self._max_connections:
            self.refused_connections += 1
            if self.refused_connections in (1, 100) or self.refused_connections % 10_000 == 0:
                log.warning(
                    "health server: %d connection(s) closed at once: already %d open (limit)",
                    self.refused_connections,
                    self._max_connections,
                )
            writer.transport.abort()  # frees the socket now; no FIN handshake to wait for
            return
        self._open_writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            async with asyncio.timeout(self._request_timeout_s):
                try:
                    async with asyncio.timeout(self._header_timeout_s):
                        method, path = await _read_request(reader)
                except (_BadRequest, asyncio.LimitOverrunError, ValueError) as exc:
                    method, response = "GET", (400, _TEXT, f"bad request: {exc}\n".encode())
                else:
                    response = await self._respond(method, path)
                if not writer.is_closing():  # not shut down meanwhile
                    await _write_response(writer, method, *response)
        except (TimeoutError, ConnectionError) as exc:
            log.debug("health server: dropped a connection: %r", exc)
        finally:
            self._open_writers.discard(writer)
            self._handlers.discard(handler)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        text = _TEXT
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET and HEAD are supported\n"
        if path == "/metrics":
            body = await asyncio.to_thread(generate_latest, self._registry)
            return 200, CONTENT_TYPE_LATEST, body
        if path == "/healthz":
            status = self._health()
            word = "ok" if status.healthy else "unhealthy"
            return (200 if status.healthy else 503), text, f"{word}: {status.detail}\n".encode()
        return 404, text, b"not found; try /metrics or /healthz\n"


class _BadRequest(Exception):
    pass


async def _write_response(
    writer: asyncio.StreamWriter, method: str, status: int, content_type: str, body: bytes
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and path of one request; headers are read and ignored."""
    try:
        request_line = (await reader.readuntil(b"\r\n")).decode("latin-1").strip()
    except asyncio.IncompleteReadError as exc:
        raise _BadRequest("connection closed before a request line") from exc
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line {request_line[:80]!r}")
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return parts[0].upper(), parts[1].split("?", 1)[0]
    raise _BadRequest("too many header lines")
