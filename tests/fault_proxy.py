"""A fault-injecting HTTP proxy on loopback, in front of a real S3 server (moto).

Raw asyncio sockets, so faults are exact: each client request is forwarded on a fresh
upstream connection, the whole upstream answer is read, and then it is sent back to the
client (keep-alive, ``Content-Length`` framing), unless a scripted :class:`Fault` says
otherwise: reset the connection, answer an S3 error status, truncate the body, stall
mid-body, corrupt a byte, or run a hook first (e.g. replace the object). It counts the
requests and the body bytes it delivered, and can pace bodies to a rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

FaultKind = Literal["reset", "status", "truncate", "stall", "corrupt", "hook", "rewrite"]
_SLICE_BYTES = 64 * 1024


@dataclass
class Fault:
    """What to do to matching requests. ``times=None`` means every matching request."""

    kind: FaultKind
    method: str = "GET"
    key: str | None = None  # the request path must end with "/" + key
    range_start: int | None = None  # only ranged GETs starting at this offset
    times: int | None = 1
    after_bytes: int = 0  # body bytes delivered before truncate/stall/reset/corrupt
    status: int = 500
    code: str = "InternalError"
    stall_s: float = 60.0
    hook: Callable[[], Awaitable[None]] | None = None
    rewrite: Callable[[Response], Response] | None = None  # kind "rewrite": lie about it
    path_contains: str | None = None  # the request path (with its query) must contain it
    hits: int = 0

    def matches(self, request: Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if request.method != self.method:
            return False
        if self.key is not None and not request.path.split("?")[0].endswith("/" + self.key):
            return False
        if self.path_contains is not None and self.path_contains not in request.path:
            return False
        return self.range_start is None or request.range_start == self.range_start


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    head_bytes: bytes
    body: bytes = b""

    @property
    def range_start(self) -> int | None:
        value = self.headers.get("range", "")
        if not value.startswith("bytes="):
            return None
        return int(value.removeprefix("bytes=").split("-")[0])


@dataclass
class Response:
    status_line: bytes
    headers: list[tuple[str, str]]
    body: bytes
    raw: bool = False  # send the headers exactly as they are (a lie about the framing)


@dataclass
class ProxyStats:
    requests: list[tuple[str, str, int | None]] = field(default_factory=list)
    body_bytes_sent: int = 0

    def gets(self) -> list[tuple[str, str, int | None]]:
        return [r for r in self.requests if r[0] == "GET"]


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def _read_upstream(reader: asyncio.StreamReader, method: str) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    pairs = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        pairs.append((name.strip(), value.strip()))
    headers = {k.lower(): v for k, v in pairs}
    status = int(lines[0].split()[1])
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read()
    return Response(lines[0], pairs, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (connection reset by peer), not a clean FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """``async with FaultProxy(upstream_url) as proxy:`` then point a store at ``proxy.url``."""

    def __init__(self, upstream_url: str, *, rate_bytes_per_s: float | None = None) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate_bytes_per_s = rate_bytes_per_s
        self.faults: list[Fault] = []
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self.url = ""

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    @property
    def open_connections(self) -> int:
        """Client connections still being served."""
        return len(self._handlers)

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # End the handlers by closing their connections and waking their waits (a
        # cancelled handler task makes asyncio log "Exception in callback").
        self._closing.set()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._handlers):
            with contextlib.suppress(Exception):
                await task
        await self._server.wait_closed()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the proxy is closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, or the proxy is closing
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    def _take_fault(self, request: Request) -> Fault | None:
        for fault in self.faults:
            if fault.matches(request):
                fault.hits += 1
                return fault
        return None

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = await _read_head(reader)
        if head is None:
            return False
        lines = head[:-4].split(b"\r\n")
        method, path, _ = lines[0].decode("latin-1").split(" ", 2)
        headers = _parse_headers(lines[1:])
        if headers.get("expect", "").lower() == "100-continue":  # botocore's PUTs ask first
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        request = Request(method, path, headers, head, body)
        self.stats.requests.append((method, path, request.range_start))
        fault = self._take_fault(request)
        if fault is not None and fault.hook is not None:
            await fault.hook()
        if fault is not None and fault.kind == "reset" and fault.after_bytes == 0:
            _abort(writer)
            return False
        if fault is not None and fault.kind == "status":
            await self._send_error(writer, fault, with_body=method != "HEAD")
            return True
        response = await self._forward(request)
        if fault is not None and fault.kind == "rewrite" and fault.rewrite is not None:
            response = fault.rewrite(response)
        return await self._send(writer, request, response, fault)

    async def _forward(self, request: Request) -> Response:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            kept = [
                line
                for line in request.head_bytes[:-4].split(b"\r\n")
                if not line.lower().startswith((b"connection:", b"keep-alive:", b"expect:"))
            ]
            up_writer.write(b"\r\n".join([*kept, b"Connection: close", b"", b""]) + request.body)
            await up_writer.drain()
            return await _read_upstream(up_reader, request.method)
        finally:
            up_writer.close()

    async def _send_error(
        self, writer: asyncio.StreamWriter, fault: Fault, *, with_body: bool
    ) -> None:
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
            "<Message>injected by the fault proxy</Message></Error>"
        ).encode()
        reason = {429: "Too Many Requests", 500: "Internal Server Error"}.get(fault.status, "X")
        writer.write(
            f"HTTP/1.1 {fault.status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + (body if with_body else b"")
        )
        await writer.drain()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        response: Response,
        fault: Fault | None,
    ) -> bool:
        skip = {"connection", "keep-alive", "transfer-encoding"}
        if request.method != "HEAD":
            skip.add("content-length")
        if response.raw:
            skip = set()
        lines = [response.status_line]
        kept = [(k, v) for k, v in response.headers if k.lower() not in skip]
        lines += [f"{k}: {v}".encode("latin-1") for k, v in kept]
        if request.method != "HEAD" and not response.raw:
            lines.append(f"Content-Length: {len(response.body)}".encode())
        writer.write(b"\r\n".join([*lines, b"", b""]))
        body = response.body
        if fault is not None and fault.kind == "corrupt" and fault.after_bytes < len(body):
            at = fault.after_bytes
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        cut = len(body)
        if fault is not None and fault.kind in ("truncate", "stall", "reset"):
            cut = min(fault.after_bytes, len(body))
        await self._send_body(writer, body[:cut], count=request.method == "GET")
        if cut == len(body):
            return True
        assert fault is not None
        if fault.kind == "stall":
            await self._pause(fault.stall_s)
        if fault.kind == "reset":
            _abort(writer)
        else:
            writer.close()
        return False

    async def _send_body(self, writer: asyncio.StreamWriter, body: bytes, *, count: bool) -> None:
        view = memoryview(body)
        for start in range(0, len(body), _SLICE_BYTES):
            piece = view[start : start + _SLICE_BYTES]
            writer.write(piece)
            await writer.drain()
            if count:
                self.stats.body_bytes_sent += len(piece)
            if self.rate_bytes_per_s:
                await self._pause(len(piece) / self.rate_bytes_per_s)
            if self._closing.is_set():
                raise ConnectionResetError("the proxy is closing")
