"""HTTP/1.1 GETs on blocking sockets in worker threads: the data plane of presigned reads.

Every byte of a presigned GET (a download's parts, a peer's payload) is received here, in a
worker thread, never on the event loop. ``recv_into``, the hashing, ``pwritev`` and TLS
decryption all release the interpreter lock, so many streams use every core, and each
thread writes what it received before it receives more: no hand-off to another thread per
MiB, no wake-up of the event loop per MiB, one user-space copy of each byte (the kernel's).
:class:`~tplr.comms.download.http.PresignedRangeReader` does the rest on the event loop
(URLs, connecting, the keep-alive pool, retries, cancellation).

Answers are untrusted: the status line, every header used and the body's framing are
checked here (``parse_response_head``, ``content_length``, the reader's
``check_answer``), and only typed :class:`~tplr.comms.errors.StoreError` come out.
Blocking: call these functions in a thread.
"""

from __future__ import annotations

import contextlib
import email.utils
import mmap
import re
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tplr.comms.buffers import FreshBytes
from tplr.comms.errors import MalformedResponse, TransientError
from tplr.comms.stores.base import ObjectInfo
from tplr.untrusted import MalformedInput, parse_ascii_int

if TYPE_CHECKING:
    from tplr.comms.download.http import PresignedRangeReader

# per connection (anonymous memory touched only as it fills): a receive waits in the kernel
# until a whole batch is there, so a thread wakes once per 512 KiB (measured on 2 cores:
# fewer wake-ups, less contention for the interpreter lock among many streams)
WRITE_BATCH_BYTES = 512 * 1024
_MAX_HEAD_BYTES = 64 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
_MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

Sink = Callable[[memoryview], None]
"""Called in the receiving thread with each batch of the body, in order; the view is only
valid during the call."""


# -- parsing answers (untrusted) --------------------------------------------------------


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


# -- connections ------------------------------------------------------------------------


class Stale(TransientError):
    """A kept-alive connection closed before any answer (the server dropped it while it
    sat idle): not a failure of the request, which is asked again on a fresh one."""


class Link:
    """One connection, used by one worker thread at a time; :meth:`abort` (any thread)
    wakes that thread out of a blocking receive, which then fails.

    The socket blocks in the kernel, bounded by ``SO_RCVTIMEO``/``SO_SNDTIMEO`` (the read
    timeout), so :meth:`receive_into` can wait for a whole batch (``MSG_WAITALL``) and
    wake its thread once per batch. TLS is set up in the worker thread on first use
    (:meth:`ready`), so the handshake does not run on the event loop either.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout_s: float,
        tls: ssl.SSLContext | None,
        server_hostname: str,
    ) -> None:
        sock.setblocking(True)
        seconds, fraction = divmod(max(timeout_s, 0.001), 1.0)
        timeval = struct.pack("ll", int(seconds), int(fraction * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.sock = sock
        self._tls = tls
        self._server_hostname = server_hostname
        self._lock = threading.Lock()  # orders abort() against close()
        self._closed = False
        self._buffer: mmap.mmap | None = None
        self.reused = False  # it served an earlier request
        self.spent = False  # the server closed it, or sent more than it declared

    def ready(self) -> None:
        if self._tls is None:
            return
        context, self._tls = self._tls, None
        wrapped = context.wrap_socket(
            self.sock, server_hostname=self._server_hostname, do_handshake_on_connect=False
        )
        with self._lock:
            self.sock = wrapped
        wrapped.do_handshake()

    @property
    def view(self) -> memoryview:
        """The connection's receive buffer (one batch)."""
        if self._buffer is None:  # private anonymous memory: no zero fill, no shmem
            self._buffer = mmap.mmap(
                -1, WRITE_BATCH_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
        return memoryview(self._buffer)

    def receive_into(self, into: memoryview) -> int:
        """Fill ``into``; returns less only at the end of the stream, on the timeout or on
        an abort (0: nothing came). TLS records are decrypted as they come."""
        if isinstance(self.sock, ssl.SSLSocket):
            return self.sock.recv_into(into)
        return self.sock.recv_into(into, len(into), socket.MSG_WAITALL)

    def idle_and_open(self) -> bool:
        """True when nothing is waiting on the connection and the server has not closed
        it (one non-blocking poll): it may carry the next request."""
        if self.spent or self._closed:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        # readable while idle: either the server closed it or it sent something unasked
        # for; either way it cannot carry a request
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def abort(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    # the plain socket's shutdown, even under TLS: it only wakes the reader
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.sock.close()
        self._buffer = None  # unmapped once no view of it is left (a traceback may hold one)


@contextlib.contextmanager
def _socket_errors(reader: PresignedRangeReader, where: str) -> Iterator[None]:
    """A timeout or a socket failure as a ``TransientError`` naming the request."""
    try:
        yield
    except (TimeoutError, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
        # (a blocking socket's SO_RCVTIMEO/SO_SNDTIMEO expiring reads as EAGAIN)
        raise TransientError(
            f"timed out: no data for {reader.read_timeout_s:g} s: {where}",
            location=reader.location,
        ) from exc
    except OSError as exc:  # ssl.SSLError included
        raise TransientError(
            f"connection failed: {where}: {type(exc).__name__}: {exc}", location=reader.location
        ) from exc


def _ask(link: Link, request: bytes, where: str) -> tuple[int, dict[str, str], bytes]:
    """Send ``request``; the answer's status, headers and the body bytes that came with
    the head. A reused connection that fails before any answer raises :class:`Stale`."""
    link.ready()
    data = b""
    try:
        link.sock.sendall(request)
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > _MAX_HEAD_BYTES:
                raise MalformedResponse(f"response head too large: {where}")
            chunk = link.sock.recv(65536)
            if not chunk:
                raise TransientError(f"connection closed before an answer: {where}")
            data += chunk
    except (OSError, TransientError) as exc:
        timed_out = isinstance(exc, TimeoutError | BlockingIOError | ssl.SSLWantReadError)
        if link.reused and not data and not timed_out:
            raise Stale(f"kept-alive connection closed: {where}") from exc
        raise
    status, headers = parse_response_head(data[:end], where)
    if headers.get("connection", "").lower() == "close":
        link.spent = True
    return status, headers, data[end + 4 :]


def _error_body(link: Link, headers: dict[str, str], rest: bytes, where: str) -> bytes:
    """The (small) body of an error answer; best effort, the connection is dropped."""
    link.spent = True
    wanted = min(content_length(headers, where) or 0, MAX_ERROR_BODY_BYTES)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        wanted = MAX_ERROR_BODY_BYTES
    body = rest
    with contextlib.suppress(OSError):
        while len(body) < wanted and b"</Error>" not in body:
            chunk = link.sock.recv(MAX_ERROR_BODY_BYTES)
            if not chunk:
                break
            body += chunk
    return body[:MAX_ERROR_BODY_BYTES]


def _check_ranged(
    reader: PresignedRangeReader,
    link: Link,
    answer: tuple[int, dict[str, str], bytes],
    offset: int,
    length: int,
    if_match: str | None,
    where: str,
) -> None:
    status, headers, rest = answer
    declared = content_length(headers, where)
    if "transfer-encoding" in headers and status in (200, 206):
        raise MalformedResponse(
            f"{where}: a ranged answer with Transfer-Encoding"
            f" {headers['transfer-encoding'][:40]!r}",
            location=reader.location,
        )
    whole = status == 200 and offset == 0 and declared == length
    if status != 206 and not whole:
        body = b"" if status == 200 else _error_body(link, headers, rest, where)
        raise reader.status_error(status, headers, body, where)
    reader.check_answer(headers, offset, length, if_match, where, whole=whole)


def _short(reader: PresignedRangeReader, where: str, got: int, length: int) -> TransientError:
    return TransientError(
        f"short read: {where} ended after {got} of {length} bytes", location=reader.location
    )


def _leading(link: Link, rest: bytes, length: int) -> memoryview:
    """The part of ``rest`` that belongs to a body of ``length`` bytes."""
    if len(rest) > length:
        link.spent = True  # bytes nobody asked for: never reuse the connection
    return memoryview(rest)[:length]


def _receive_into(
    reader: PresignedRangeReader, link: Link, rest: bytes, into: memoryview, where: str
) -> None:
    length = len(into)
    leading = _leading(link, rest, length)
    into[: len(leading)] = leading
    taken = len(leading)
    while taken < length:
        got = link.receive_into(into[taken:])
        if not got:
            raise _short(reader, where, taken, length)
        taken += got


def _stream_into(
    reader: PresignedRangeReader, link: Link, rest: bytes, length: int, sink: Sink, where: str
) -> None:
    """The body, ``length`` bytes, handed to ``sink`` in batches of
    :data:`WRITE_BATCH_BYTES` (fewer, larger writes) received into the link's buffer."""
    leading = _leading(link, rest, length)
    if leading:
        sink(leading)
    done = len(leading)
    view = link.view
    while done < length:
        want = min(len(view), length - done)
        filled = 0
        try:
            while filled < want:
                got = link.receive_into(view[filled:want])
                if not got:
                    raise _short(reader, where, done + filled, length)
                filled += got
        finally:
            if filled:  # what came is kept (a retry continues after it), even on a failure
                sink(view[:filled])
        done += filled


def blocking_stream(
    reader: PresignedRangeReader,
    link: Link,
    url: str,
    offset: int,
    length: int,
    if_match: str | None,
    sink: Sink,
) -> None:
    """Ranged GET of ``[offset, offset + length)``, its body handed to ``sink``."""
    where = f"GET {reader.location} bytes {offset}-{offset + length - 1}"
    with _socket_errors(reader, where):
        answer = _ask(link, reader.request_bytes(url, offset, length, if_match), where)
        _check_ranged(reader, link, answer, offset, length, if_match, where)
        _stream_into(reader, link, answer[2], length, sink, where)


def blocking_read_into(
    reader: PresignedRangeReader,
    link: Link,
    url: str,
    offset: int,
    into: memoryview,
    if_match: str | None,
) -> None:
    """Ranged GET of ``len(into)`` bytes from ``offset``, received straight into ``into``."""
    length = len(into)
    where = f"GET {reader.location} bytes {offset}-{offset + length - 1}"
    with _socket_errors(reader, where):
        answer = _ask(link, reader.request_bytes(url, offset, length, if_match), where)
        _check_ranged(reader, link, answer, offset, length, if_match, where)
        _receive_into(reader, link, answer[2], into, where)


def blocking_fetch_whole(
    reader: PresignedRangeReader,
    link: Link,
    url: str,
    key: str,
    check: Callable[[ObjectInfo], None],
) -> tuple[bytes, ObjectInfo]:
    """GET the whole object: its info from the answer's head (``check`` may refuse it by
    raising before a byte of the body is read), then its body, received straight into
    the ``bytes`` returned (:class:`~tplr.comms.buffers.FreshBytes`)."""
    where = f"GET {reader.location}"
    with _socket_errors(reader, where):
        status, headers, rest = _ask(link, reader.request_bytes(url, 0, 0, None, whole=True), where)
        if status != 200:
            body = _error_body(link, headers, rest, where)
            raise reader.status_error(status, headers, body, where, whole=True)
        size = content_length(headers, where)
        if size is None or "transfer-encoding" in headers:
            raise MalformedResponse(f"{where}: no Content-Length (or a chunked body)")
        info = ObjectInfo(
            key=key,
            size=size,
            etag=strong_etag(headers.get("etag")),
            last_modified=parse_http_date(headers.get("last-modified"), where),
        )
        try:
            check(info)
        except BaseException:
            link.spent = True  # the body was not read: the connection cannot carry more
            raise
        fresh = FreshBytes(size)
        with fresh.view:
            _receive_into(reader, link, rest, fresh.view, where)
        return fresh.take(), info
