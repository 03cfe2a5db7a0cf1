"""GETs of one presigned URL: ranged parts, whole objects, on kept-alive connections.

One presigned GET URL (SigV4 query authentication, made by the store) serves every part
of an object: ``Range`` and ``If-Match`` are plain headers, not part of the signature.
The event loop here does what is cheap and must be ordered: renewing the URL, the
store's throttle, connecting (cancellable), the pool of kept-alive connections, the
one retry of a stale kept-alive connection, cancellation. The bytes are received in
worker threads (:mod:`tplr.comms.download.blocking`): each request runs start to end in one
thread, which hands the body to the caller's sink (a download's writer: hash, ``pwritev``,
journal) or receives it straight into the caller's memory.

Why threads and not an asyncio protocol: on the loop every MiB cost a wake-up, a hand-off
to a writer thread and back, and the loop thread did every ``recv`` copy (and all TLS
decryption) alone (figures in ``docs/transfers.md``).

Answers other than 206 are read and mapped to the same typed errors as the store's
(:func:`tplr.comms.stores.s3.map_s3_error`); ``SlowDown`` also slows the store's throttle.
At most one connection per concurrent request; idle ones are reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tplr.comms.download.blocking import (
    Link,
    Sink,
    Stale,
    blocking_fetch_whole,
    blocking_read_into,
    blocking_stream,
)
from tplr.comms.errors import InvalidRequest, PreconditionFailed, StoreError, TransientError
from tplr.comms.stores.base import ObjectInfo

URL_EXPIRES_S = 3600  # what the URL is signed for
URL_TTL_S = 3000.0  # when it is replaced by a fresh one
_CODE_RE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE_RE = re.compile(rb"<Message>([^<]*)</Message>")
T = TypeVar("T")

ErrorMapper = Callable[[int, str, str], StoreError]
"""(HTTP status, S3 error code, message) -> the typed error to raise."""


async def run_abortable(executor: Executor | None, work: Callable[[], T], link: Link) -> T:
    """``work()`` in a worker thread. If the caller is cancelled, ``link`` is aborted (the
    thread's blocking receive fails at once) and the thread is waited for before the
    cancellation goes on: nothing it does (a write into the caller's file) outlives the
    caller's task."""
    future = asyncio.get_running_loop().run_in_executor(executor, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        link.abort()
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: its failure is the abort's, not news
        raise


class PresignedRangeReader:
    """``async with PresignedRangeReader(url_factory, ...) as reader:``, then
    :meth:`stream` (a range, to a sink), :meth:`read_into` (a range, into memory) or
    :meth:`fetch_whole` (an object and its info, in one GET).

    ``executor`` runs the receiving threads (default: the loop's default executor); a
    download gives one thread per stream.
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
        url_ttl_s: float = URL_TTL_S,
        ssl_context: ssl.SSLContext | None = None,
        ssl_factory: Callable[[], ssl.SSLContext] | None = None,
        extra_headers: Callable[[str], list[tuple[str, str]]] | None = None,
        executor: Executor | None = None,
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
        self._idle: list[Link] = []
        self._ssl: ssl.SSLContext | None = ssl_context
        self._ssl_factory = ssl_factory  # made only for an https:// connection
        self._extra_headers = extra_headers
        self._executor = executor
        self._addresses: dict[tuple[str, int], list[tuple[Any, ...]]] = {}

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
        for link in idle:
            link.close()

    @property
    def connect_timeout_s(self) -> float:
        return self._connect_timeout_s

    @property
    def read_timeout_s(self) -> float:
        return self._read_timeout_s

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None and self._ssl_factory is not None:
            self._ssl = self._ssl_factory()
        if self._ssl is None:
            # the CA bundle botocore would use for the store's requests, if one is set
            bundle = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE")
            self._ssl = ssl.create_default_context(cafile=bundle or None)
        return self._ssl

    # -- the three requests ------------------------------------------------------------

    async def stream(
        self, offset: int, length: int, *, if_match: str | None = None, sink: Sink
    ) -> None:
        """Bytes ``[offset, offset + length)``, handed to ``sink`` in order from the
        receiving thread (batches of at least 512 KiB but the last)."""
        url = await self._current_url()
        await self._on_link(
            url, lambda link: blocking_stream(self, link, url, offset, length, if_match, sink)
        )

    async def read_into(
        self, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        """Bytes ``[offset, offset + len(into))``, received straight into ``into``."""
        url = await self._current_url()
        await self._on_link(
            url, lambda link: blocking_read_into(self, link, url, offset, into, if_match)
        )

    async def fetch_whole(
        self, key: str, check: Callable[[ObjectInfo], None]
    ) -> tuple[bytes, ObjectInfo]:
        """One plain GET of the whole object; ``check`` sees its :class:`ObjectInfo` (from
        the answer's head) before a byte of the body is read and may refuse it by raising
        (a size limit)."""
        url = await self._current_url()
        return await self._on_link(
            url, lambda link: blocking_fetch_whole(self, link, url, key, check)
        )

    # -- connections -------------------------------------------------------------------

    async def _on_link(self, url: str, work: Callable[[Link], T]) -> T:
        """Run ``work`` on a kept-alive connection (or a new one) in a worker thread; keep
        the connection for the next request if the answer left it clean."""
        throttle = self._throttle if self._throttle is not None else contextlib.nullcontext()
        async with throttle:
            link = await self._link(url)
        try:
            try:
                result = await run_abortable(self._executor, lambda: work(link), link)
            except Stale:
                # the server closed a kept-alive connection while it sat idle: that is
                # not a failure of this request, so ask again once on a fresh one
                link.close()
                link = await self._connect(url)
                result = await run_abortable(self._executor, lambda: work(link), link)
        except BaseException:
            link.close()
            raise
        if link.spent:
            link.close()
        else:
            link.reused = True
            self._idle.append(link)
        return result

    async def _link(self, url: str) -> Link:
        while self._idle:
            link = self._idle.pop()
            if link.idle_and_open():
                return link
            link.close()
        return await self._connect(url)

    async def _connect(self, url: str) -> Link:
        """A new connection, made on the loop (so it can be cancelled at once); TLS, if
        any, is set up by the thread that first uses it."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        host, port = parts.hostname or "", parts.port or (443 if secure else 80)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                addresses = self._addresses.get((host, port))
                if addresses is None:  # once per reader: a download opens many connections
                    addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    self._addresses[(host, port)] = addresses
                sock = await _first_connected(loop, addresses)
        except (OSError, TimeoutError) as exc:
            raise TransientError(
                f"cannot connect to {parts.scheme}://{parts.netloc} for {self.location}:"
                f" {type(exc).__name__}: {exc}",
                location=self.location,
            ) from exc
        return Link(
            sock,
            timeout_s=self._read_timeout_s,
            tls=self.ssl_context if secure else None,
            server_hostname=host,
        )

    # -- requests and answers (used by the receiving threads) --------------------------

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

    def error_for(self, status: int, body: bytes, where: str) -> StoreError:
        """The typed error of an error answer, from its status and S3 error XML body."""
        code_match, message_match = _CODE_RE.search(body), _MESSAGE_RE.search(body)
        code = code_match.group(1).decode("utf-8", "replace") if code_match else str(status)
        message = message_match.group(1).decode("utf-8", "replace") if message_match else ""
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailed(f"object changed: {where}", location=self.location)
        return self._map_error(status, code, message)


async def _first_connected(
    loop: asyncio.AbstractEventLoop, addresses: list[tuple[Any, ...]]
) -> socket.socket:
    """A socket connected to the first address that accepts."""
    failure: OSError = OSError("no address to connect to")
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure
