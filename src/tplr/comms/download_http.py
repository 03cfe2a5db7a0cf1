"""Ranged GETs of one presigned URL, received straight into reusable buffers.

The hot path of a large download is moving bytes from sockets to the page cache. Through
aiohttp every byte is copied three times in user space (uvloop's read buffer, the HTTP
parser's body slice, the stream reader's join) on the event-loop thread. Here each
connection is an :class:`asyncio.BufferedProtocol` that receives into its own buffer,
and the part fetcher writes that memory to the file from a worker thread: the kernel's
copy is the only one. On a 2-core machine this is what lets the loop keep up with
dozens of streams.

One presigned GET URL (SigV4 query authentication, made by the store) serves every part
of an object: ``Range`` and ``If-Match`` are plain headers, not part of the signature.
Answers other than 206 are read and mapped to the same typed errors as the store's
(:func:`tplr.comms.s3_store.map_s3_error`); ``SlowDown`` also slows the store's throttle.
Connections are kept alive and reused; at most one per concurrent part.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import mmap
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from tplr.comms.errors import (
    InvalidRequest,
    MalformedResponse,
    PreconditionFailed,
    StoreError,
    TransientError,
)
from tplr.comms.store import ObjectInfo
from tplr.untrusted import MalformedInput, parse_ascii_int

# per connection; measured: 256 KiB costs more CPU per byte, 2 MiB more system time
RECEIVE_BUFFER_BYTES = 1024 * 1024
WRITE_BATCH_BYTES = 512 * 1024  # a part's bytes are handed to the writer in such batches
URL_EXPIRES_S = 3600  # what the URL is signed for
URL_TTL_S = 3000.0  # when it is replaced by a fresh one
_MAX_ERROR_BODY_BYTES = 64 * 1024
_CODE_RE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE_RE = re.compile(rb"<Message>([^<]*)</Message>")

ErrorMapper = Callable[[int, str, str], StoreError]
"""(HTTP status, S3 error code, message) -> the typed error to raise."""


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection receiving into ``buffer``.

    The protocol appends at ``fill``; the reader consumes from ``pos``. Bytes in
    ``[pos, fill)`` that the reader has taken stay untouched until it calls
    :meth:`consume`, so the receive continues behind them while a thread writes them out.
    When the buffer is full the transport pauses until everything is consumed.
    """

    def __init__(self, buffer_bytes: int) -> None:
        # anonymous memory, not a bytearray: no zero fill, and pages are touched only as
        # they fill
        self.buffer = mmap.mmap(-1, buffer_bytes)
        self.view = memoryview(self.buffer)
        self.fill = 0
        self.pos = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 1
        self._paused = False

    # -- protocol callbacks (event loop) -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.fill :]

    def buffer_updated(self, nbytes: int) -> None:
        self.fill += nbytes
        full = self.fill == len(self.buffer)
        if full and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if full or self.available >= self._wanted:
            self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reader side -------------------------------------------------------------------

    @property
    def available(self) -> int:
        return self.fill - self.pos

    async def wait_for(self, wanted: int, timeout_s: float) -> None:
        """Wait until ``wanted`` bytes are available, the buffer is full or the peer closed.

        Waking only then (not on every socket read) batches the disk writes: fewer
        thread hops and syscalls per byte.
        """
        wanted = max(1, min(wanted, len(self.buffer) - self.pos))
        async with asyncio.timeout(timeout_s):
            while self.available < wanted and not self.closed:
                self._wanted = wanted
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter

    def consume(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos == self.fill:  # nothing pending: start over at the buffer's head
            self.pos = self.fill = 0
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()

    def reusable(self) -> bool:
        return not self.closed and self.available == 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Stale(TransientError):
    """The connection closed before any answer (an idle keep-alive the server dropped)."""


_MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_response_head(head: bytes, where: str) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower-cased) of an HTTP/1.x response head, checked as
    untrusted input: ASCII-digit status, well-formed header names, no repeated
    ``Content-Length`` with different values, at most 100 headers. Raises only
    :class:`MalformedResponse`."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0"):
        raise MalformedResponse(f"not an HTTP/1.x response to {where}: {lines[0][:80]!r}")
    try:
        status = parse_ascii_int(parts[1], what="HTTP status", min_value=100, max_value=599)
    except MalformedInput as exc:
        raise MalformedResponse(f"{where}: {exc.message}") from None
    if len(lines) - 1 > _MAX_HEADERS:
        raise MalformedResponse(f"{where}: more than {_MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedResponse(f"{where}: malformed header line {line[:80]!r}")
        name, value = name.lower(), value.strip()
        if name in headers and name == "content-length" and headers[name] != value:
            raise MalformedResponse(f"{where}: two different Content-Length headers")
        headers[name] = value if name not in headers else f"{headers[name]}, {value}"
    return status, headers


def content_length(headers: dict[str, str], where: str) -> int | None:
    """The declared body size, or None when there is none."""
    text = headers.get("content-length")
    if text is None:
        return None
    try:
        return parse_ascii_int(text, what="Content-Length", max_value=1 << 50)
    except MalformedInput as exc:
        raise MalformedResponse(f"{where}: {exc.message}") from None


def parse_http_date(value: str | None, where: str) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise MalformedResponse(f"{where}: Last-Modified {value[:60]!r} is not a date") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def strong_etag(value: str | None) -> str:
    """The ETag for ``If-Match``; "" when there is none or only a weak one."""
    if not value or value.startswith("W/"):
        return ""
    etag = value.strip().strip('"')
    if len(etag) > 256 or not (etag.isascii() and etag.isprintable()) or '"' in etag:
        return ""
    return etag


class PresignedRangeReader:
    """``async with PresignedRangeReader(url, ...) as reader:`` then ``reader.open(...)``.

    ``open(offset, length, if_match=...)`` is a context manager yielding an async iterator
    of ``memoryview`` chunks, each valid until the next is requested.
    """

    def __init__(
        self,
        url_factory: Callable[[], Awaitable[str]],
        *,
        location: str,
        connect_timeout_s: float,
        read_timeout_s: float,
        map_error: ErrorMapper,
        throttle: Any = None,
        buffer_bytes: int = RECEIVE_BUFFER_BYTES,
        url_ttl_s: float = URL_TTL_S,
        ssl_context: ssl.SSLContext | None = None,
        extra_headers: Callable[[str], list[tuple[str, str]]] | None = None,
    ) -> None:
        self._url_factory = url_factory
        self._url = ""
        self._url_made = 0.0
        self._url_ttl_s = url_ttl_s
        self.location = location
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._map_error = map_error
        self._throttle = throttle
        self._buffer_bytes = buffer_bytes
        self._idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = ssl_context
        self._extra_headers = extra_headers

    async def __aenter__(self) -> PresignedRangeReader:
        await self._refresh_url()
        return self

    async def _refresh_url(self) -> None:
        self._url = await self._url_factory()
        self._url_made = time.monotonic()

    async def _current_url(self) -> str:
        if time.monotonic() - self._url_made > self._url_ttl_s:  # presigned URLs expire
            await self._refresh_url()
        return self._url

    async def __aexit__(self, *exc_info: object) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # -- connections -------------------------------------------------------------------

    async def _connect(self, url: str, *, fresh: bool = False) -> tuple[_Connection, bool]:
        """A kept-alive connection if one is idle (and not ``fresh``), else a new one;
        returns it and whether it was reused."""
        while self._idle and not fresh:
            connection = self._idle.pop()
            if connection.reusable():
                return connection, True
            connection.close()
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        # (https: the CA bundle botocore would use for the store's requests, if one is set)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._buffer_bytes),
                    parts.hostname,
                    parts.port or (443 if secure else 80),
                    ssl=self.ssl_context if secure else None,
                )
        except (OSError, TimeoutError) as exc:
            raise TransientError(
                f"cannot connect to {parts.scheme}://{parts.netloc} for {self.location}:"
                f" {type(exc).__name__}: {exc}",
                location=self.location,
            ) from exc
        return connection, False

    @property
    def connect_timeout_s(self) -> float:
        return self._connect_timeout_s

    @property
    def read_timeout_s(self) -> float:
        return self._read_timeout_s

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        if self._ssl is None:
            bundle = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE")
            self._ssl = ssl.create_default_context(cafile=bundle or None)
        return self._ssl

    def status_error(
        self, status: int, headers: dict[str, str], body: bytes, where: str, *, whole: bool = False
    ) -> StoreError:
        """The error of a non-206 answer (non-200 for a ``whole`` GET) whose body, if any,
        is ``body``."""
        if status == 200 and not whole:
            return InvalidRequest(
                f"the endpoint ignored the Range header of {where} (HTTP 200)",
                location=self.location,
                hint="use an S3-compatible endpoint that supports ranged GETs",
            )
        return self.error_for(status, body, where)

    def request_bytes(
        self, url: str, offset: int, length: int, if_match: str | None, *, whole: bool = False
    ) -> bytes:
        """The request of bytes ``[offset, offset + length)``, or the whole object."""
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
        if not whole:
            lines.append(f"Range: bytes={offset}-{offset + length - 1}")
        lines += ["Accept-Encoding: identity", "User-Agent: tplr-download"]
        if if_match is not None and if_match.strip('"'):
            lines.append(f'If-Match: "{if_match.strip(chr(34))}"')
        if self._extra_headers is not None:
            lines += [f"{name}: {value}" for name, value in self._extra_headers(url)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    # -- one ranged GET ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(
        self, offset: int, length: int, *, if_match: str | None = None
    ) -> AsyncIterator[AsyncIterator[memoryview]]:
        where = f"GET {self.location} bytes {offset}-{offset + length - 1}"
        async with self._answer(offset, length, if_match, where) as (connection, _headers):
            body = self._body(connection, length, where)
            async with contextlib.aclosing(body) as chunks:
                yield chunks

    @contextlib.asynccontextmanager
    async def _answer(
        self, offset: int, length: int, if_match: str | None, where: str
    ) -> AsyncIterator[tuple[_Connection, dict[str, str]]]:
        """Send the ranged GET, check the answer's head; the body follows on the
        connection, which is kept alive for the next request if it was read to its end."""
        url = await self._current_url()
        request = self.request_bytes(url, offset, length, if_match)
        throttle = self._throttle if self._throttle is not None else contextlib.nullcontext()
        async with throttle:
            connection, reused = await self._connect(url)
        reuse = False
        try:
            try:
                status, headers = await self._ask(connection, request, where)
            except _Stale:
                if not reused:
                    raise
                # the server closed a kept-alive connection while it sat idle: that is
                # not a failure of this request, so ask again once on a fresh one
                connection.close()
                connection, _ = await self._connect(url, fresh=True)
                status, headers = await self._ask(connection, request, where)
            declared = content_length(headers, where)
            if "transfer-encoding" in headers and status in (200, 206):
                raise MalformedResponse(
                    f"{where}: a ranged answer with Transfer-Encoding"
                    f" {headers['transfer-encoding'][:40]!r}",
                    location=self.location,
                )
            whole = status == 200 and offset == 0 and declared == length
            if status != 206 and not whole:
                await self._raise_for(connection, status, headers, where)
            self.check_answer(headers, offset, length, if_match, where, whole=whole)
            yield connection, headers
            reuse = connection.reusable() and headers.get("connection", "").lower() != "close"
        finally:
            if reuse:
                self._idle.append(connection)
            else:
                connection.close()

    async def _ask(
        self, connection: _Connection, request: bytes, where: str
    ) -> tuple[int, dict[str, str]]:
        """Send the request and read the answer's status line and headers."""
        assert connection.transport is not None
        connection.transport.write(request)
        while True:
            end = connection.buffer.find(b"\r\n\r\n", connection.pos, connection.fill)
            if end >= 0:
                break
            if connection.closed:
                raise _Stale(f"connection closed before an answer: {where}", location=self.location)
            if connection.fill == len(connection.buffer):
                raise InvalidRequest(f"response head too large: {where}", location=self.location)
            await self._wait(connection, connection.available + 1, where)
        head = bytes(connection.view[connection.pos : end])
        connection.consume(end + 4 - connection.pos)
        return parse_response_head(head, where)

    async def _wait(self, connection: _Connection, wanted: int, where: str) -> None:
        try:
            await connection.wait_for(wanted, self._read_timeout_s)
        except TimeoutError as exc:
            raise TransientError(
                f"timed out: no data for {self._read_timeout_s:g} s: {where}",
                location=self.location,
            ) from exc

    async def _body(
        self, connection: _Connection, length: int, where: str
    ) -> AsyncIterator[memoryview]:
        left = length
        while left > 0:
            if connection.available == 0:
                if connection.closed:
                    raise TransientError(
                        f"short read: {where} ended after {length - left} of {length} bytes"
                        f" ({type(connection.lost).__name__ if connection.lost else 'closed'})",
                        location=self.location,
                    )
                await self._wait(connection, min(left, WRITE_BATCH_BYTES), where)
                continue
            take = min(connection.available, left)
            yield connection.view[connection.pos : connection.pos + take]
            connection.consume(take)
            left -= take

    def check_answer(
        self,
        headers: dict[str, str],
        offset: int,
        length: int,
        if_match: str | None,
        where: str,
        *,
        whole: bool,
    ) -> None:
        etag = headers.get("etag", "").strip('"')
        if if_match and if_match.strip('"') and etag and etag != if_match.strip('"'):
            raise PreconditionFailed(
                f"object changed: {where} answered ETag {etag}", location=self.location
            )
        if whole:
            return
        expected = f"bytes {offset}-{offset + length - 1}/"
        declared = headers.get("content-length", "")
        if not headers.get("content-range", "").startswith(expected) or declared != str(length):
            raise InvalidRequest(
                f"unexpected answer to {where}: Content-Range"
                f" {headers.get('content-range')!r}, Content-Length {declared!r}",
                location=self.location,
            )

    async def _raise_for(
        self, connection: _Connection, status: int, headers: dict[str, str], where: str
    ) -> None:
        body = b"" if status == 200 else await self._error_body(connection, headers, where)
        raise self.status_error(status, headers, body, where)

    def error_for(self, status: int, body: bytes, where: str) -> StoreError:
        """The typed error of an error answer, from its status and S3 error XML body."""
        code_match, message_match = _CODE_RE.search(body), _MESSAGE_RE.search(body)
        code = code_match.group(1).decode("utf-8", "replace") if code_match else str(status)
        message = message_match.group(1).decode("utf-8", "replace") if message_match else ""
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailed(f"object changed: {where}", location=self.location)
        return self._map_error(status, code, message)

    async def fetch_whole_in_thread(
        self, key: str, check: Callable[[ObjectInfo], None]
    ) -> tuple[bytes, ObjectInfo]:
        """One plain GET of the whole object in a worker thread; ``check`` sees its
        :class:`ObjectInfo` (from the answer's headers) before a byte of the body is read
        and may refuse it by raising (a size limit)."""
        from tplr.comms.http_blocking import blocking_fetch_whole

        url = await self._current_url()
        return await asyncio.to_thread(blocking_fetch_whole, self, url, key, check)

    async def read_into_in_thread(
        self, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        """One ranged GET of ``len(into)`` bytes received straight into ``into``, on a
        blocking socket in a worker thread: many whole objects at once (a window's
        payloads) then receive and copy on every core, not only on the event loop's
        (measured: about 1.3x on 2 cores). No connection is kept."""
        from tplr.comms.http_blocking import blocking_read_into

        url = await self._current_url()
        throttle = self._throttle if self._throttle is not None else contextlib.nullcontext()
        async with throttle:
            pass  # the request is counted; it runs outside the loop
        await asyncio.to_thread(blocking_read_into, self, url, offset, into, if_match)

    async def _error_body(
        self, connection: _Connection, headers: dict[str, str], where: str
    ) -> bytes:
        """The (small) body of an error answer; best effort, the connection is dropped."""
        wanted = min(content_length(headers, where) or 0, _MAX_ERROR_BODY_BYTES)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            wanted = _MAX_ERROR_BODY_BYTES
        with contextlib.suppress(TransientError):
            while connection.available < wanted and not connection.closed:
                if b"</Error>" in connection.buffer[connection.pos : connection.fill]:
                    break
                await self._wait(connection, connection.available + 1, where)
        body = bytes(connection.view[connection.pos : connection.fill])
        connection.closed = True  # never reuse a connection after an error answer
        return body
