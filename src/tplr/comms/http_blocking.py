"""One ranged GET on a blocking socket, received straight into the caller's memory.

The worker-thread twin of the asyncio range reader
(:class:`~tplr.comms.download_http.PresignedRangeReader`), for whole small objects fetched
many at once (the gather path): ``recv_into`` and the page faults of fresh memory
then run on every core instead of only on the event loop's. Everything about the answer
is checked exactly as the asyncio reader checks it (the same head parser, the same
``Content-Range``/ETag checks, the same error mapping). Blocking: call it in a thread.
"""

from __future__ import annotations

import contextlib
import mmap
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tplr.comms.download_http import (
    MalformedResponse,
    TransientError,
    content_length,
    parse_http_date,
    parse_response_head,
    strong_etag,
)
from tplr.comms.store import ObjectInfo

if TYPE_CHECKING:
    from tplr.comms.download_http import PresignedRangeReader

_MAX_HEAD_BYTES = 64 * 1024


def _connect(reader: PresignedRangeReader, url: str) -> socket.socket:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    try:
        sock = socket.create_connection(
            (parts.hostname, parts.port or (443 if secure else 80)),
            timeout=reader.connect_timeout_s,
        )
        if secure:
            context = reader.ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
    except OSError as exc:
        raise TransientError(
            f"cannot connect to {parts.scheme}://{parts.netloc} for {reader.location}:"
            f" {type(exc).__name__}: {exc}",
            location=reader.location,
        ) from exc
    sock.settimeout(reader.read_timeout_s)
    return sock


@contextlib.contextmanager
def _socket_errors(reader: PresignedRangeReader, where: str) -> Iterator[None]:
    """A timeout or a socket failure as the ``TransientError`` the asyncio reader raises."""
    try:
        yield
    except TimeoutError as exc:
        raise TransientError(
            f"timed out: no data for {reader.read_timeout_s:g} s: {where}",
            location=reader.location,
        ) from exc
    except OSError as exc:
        raise TransientError(
            f"connection failed: {where}: {type(exc).__name__}: {exc}", location=reader.location
        ) from exc


def _read_head(sock: socket.socket, where: str) -> tuple[bytes, bytes]:
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > _MAX_HEAD_BYTES:
            raise MalformedResponse(f"response head too large: {where}")
        chunk = sock.recv(65536)
        if not chunk:
            raise TransientError(f"connection closed before an answer: {where}")
        data += chunk
    return data[:end], data[end + 4 :]


def blocking_read_into(
    reader: PresignedRangeReader, url: str, offset: int, into: memoryview, if_match: str | None
) -> None:
    length = len(into)
    where = f"GET {reader.location} bytes {offset}-{offset + length - 1}"
    request = reader.request_bytes(url, offset, length, if_match)
    with _socket_errors(reader, where), _connect(reader, url) as sock:
        sock.sendall(request)
        head, rest = _read_head(sock, where)
        status, headers = parse_response_head(head, where)
        declared = content_length(headers, where)
        if "transfer-encoding" in headers and status in (200, 206):
            raise MalformedResponse(f"{where}: a ranged answer with Transfer-Encoding")
        whole = status == 200 and offset == 0 and declared == length
        if status != 206 and not whole:
            raise reader.status_error(status, headers, rest[:65536], where)
        reader.check_answer(headers, offset, length, if_match, where, whole=whole)
        _receive(sock, into, rest, where, reader.location)


def blocking_fetch_whole(
    reader: PresignedRangeReader, url: str, key: str, check: Callable[[ObjectInfo], None]
) -> tuple[bytes, ObjectInfo]:
    """GET the whole object: its info from the answer's headers (``check`` may refuse it
    before the body is read), then its body, straight into anonymous memory."""
    where = f"GET {reader.location}"
    request = reader.request_bytes(url, 0, 0, None, whole=True)
    with _socket_errors(reader, where), _connect(reader, url) as sock:
        sock.sendall(request)
        head, rest = _read_head(sock, where)
        status, headers = parse_response_head(head, where)
        if status != 200:
            raise reader.status_error(status, headers, rest[:65536], where, whole=True)
        size = content_length(headers, where)
        if size is None or "transfer-encoding" in headers:
            raise MalformedResponse(f"{where}: no Content-Length (or a chunked body)")
        info = ObjectInfo(
            key=key,
            size=size,
            etag=strong_etag(headers.get("etag")),
            last_modified=parse_http_date(headers.get("last-modified"), where),
        )
        check(info)
        if size == 0:
            return b"", info
        with mmap.mmap(-1, size) as buffer, memoryview(buffer) as view:
            _receive(sock, view, rest, where, reader.location)
            return buffer[:], info


def _receive(sock: socket.socket, into: memoryview, rest: bytes, where: str, location: str) -> None:
    length = len(into)
    taken = min(len(rest), length)
    into[:taken] = rest[:taken]
    while taken < length:
        got = sock.recv_into(into[taken:])
        if not got:
            raise TransientError(
                f"short read: {where} ended after {taken} of {length} bytes", location=location
            )
        taken += got
