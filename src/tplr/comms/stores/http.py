"""``HttpStore``: a read-only :class:`~tplr.comms.stores.base.ObjectStore` over HTTP(S).

A base URL (``https://host/path/``) whose keys are relative paths below it: a plain web
server, a CDN, or a dataset hub (``hf://datasets/OWNER/REPO`` resolves to
``{HF_ENDPOINT}/datasets/OWNER/REPO/resolve/{revision}/``, see :mod:`tplr.comms.stores.url`).

- ``head`` sends ``HEAD`` and follows redirects (at most :data:`MAX_REDIRECTS`, as the hub
  redirects a file to its CDN); the final URL is remembered and every ranged GET of the
  download goes straight there (``presigned_get_url``), through the transfer engine's raw
  reader. Where the final host refuses ``HEAD`` (a presigned CDN URL), a ``GET`` of byte 0
  gives the size from ``Content-Range``.
- The size is ``Content-Length``; the ETag, when the server sends a strong one, pins every
  ranged GET with ``If-Match`` (a replaced file answers 412 and the download starts over).
- A token (``HF_TOKEN``) is sent as ``Authorization: Bearer`` to the base URL's own origin
  only, never to a host it redirects to; it is a ``SecretStr`` and appears nowhere else.
- TLS is verified against the system's CAs, or the bundle named by ``TPLR_CA_BUNDLE``.
- ``list`` needs a listing: the hub's tree API (``/api/datasets/OWNER/REPO/tree/REV/PATH``,
  JSON, paginated by ``Link: <…>; rel="next"``) when one is configured. Anything else
  raises ``InvalidRequest``: a dataset on a plain web server needs its ``manifest.json``.
- Writes raise ``InvalidRequest`` (read-only).

Metadata requests (HEAD, small GETs) run ``http.client`` in a worker thread; bulk bytes
use the asyncio range reader. Every answer is parsed as untrusted input.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from pydantic import SecretStr

from tplr.comms.download.blocking import content_length, parse_http_date, strong_etag
from tplr.comms.errors import (
    AccessDenied,
    InvalidRequest,
    MalformedResponse,
    NotFound,
    PreconditionFailed,
    StoreError,
    Throttled,
    TransientError,
)
from tplr.comms.stores.base import CompletedPart, ObjectInfo
from tplr.untrusted import MalformedInput, check_key, check_prefix, load_json

MAX_REDIRECTS = 5
MAX_SMALL_BODY_BYTES = 256 * 1024 * 1024  # get(): manifests, JSON; payloads use get_range
MAX_LISTING_PAGES = 1000
MAX_LISTING_PAGE_BYTES = 64 * 1024 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_CONTENT_RANGE_TOTAL = re.compile(r"bytes 0-0/([0-9]{1,19})")


Signer = Callable[[str, str], str]
"""(method, URL) -> the URL to send (an S3 bucket's presigned URL,
:mod:`tplr.comms.stores.sigv4`)."""


@dataclass(frozen=True)
class HttpSource:
    """Where an :class:`HttpStore` reads. ``tree_api`` is the hub's listing URL prefix.

    ``signer`` presigns every request (an S3 bucket read without botocore, whose keys are
    shown as ``display_base`` + key, e.g. ``s3://bucket/``; redirects are not followed)."""

    base_url: str  # ends with "/"
    token: SecretStr | None = None
    ca_bundle: Path | None = None
    tree_api: str | None = None
    hint: str = "check the URL"  # what an operator should check on 401/403/404
    signer: Signer | None = None
    display_base: str | None = None


_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "TooManyRequests", "RequestLimitExceeded"})


def http_status_error(
    status: int, where: str, location: str, *, auth_hint: str, code: str = ""
) -> StoreError:
    """The typed error for an HTTP error status (and an S3 error code, when the body had
    one: ``SlowDown`` is a throttle, whatever its status)."""
    if code in _THROTTLE_CODES:
        return Throttled(f"{where} was throttled: HTTP {status} {code}", location=location)
    if status in (404, 410):
        return NotFound(f"not found: {where} (HTTP {status})", location=location)
    if status in (401, 403):
        return AccessDenied(
            f"access denied: {where} (HTTP {status})", location=location, hint=auth_hint
        )
    if status == 412:
        return PreconditionFailed(f"object changed: {where} (HTTP 412)", location=location)
    if status == 416:
        return InvalidRequest(f"range not satisfiable: {where}", location=location)
    if status == 429:
        return Throttled(f"{where} was throttled (HTTP 429)", location=location)
    if status == 408 or 500 <= status <= 599:
        return TransientError(f"{where} failed: HTTP {status}", location=location)
    if 400 <= status <= 499:
        return InvalidRequest(f"request rejected: {where} (HTTP {status})", location=location)
    return MalformedResponse(f"{where}: unexpected HTTP status {status}", location=location)


class HttpStore:
    """Read-only store over HTTP(S); see the module doc. ``async with`` is optional."""

    def __init__(
        self,
        source: HttpSource,
        *,
        timeout_s: float = 60.0,
        fallback: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
    ) -> None:
        """``fallback`` opens another store for the same objects (the S3 client, for a
        signed source) that answers ``head``/``get`` when a direct request fails: its error
        is the precise one (which of bucket or key is missing, the S3 error code, the
        endpoint's words), and it works where a server mishandles presigned requests."""
        parts = urlsplit(source.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"not an http(s) URL: {source.base_url!r}")
        self.source = source
        self.endpoint = source.base_url  # what a proxy check and error messages name
        self._origin = (parts.scheme, parts.netloc)
        self._timeout_s = timeout_s
        self._final_urls: dict[str, str] = {}
        self._fallback_factory = fallback
        self._fallback: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._ssl_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"HttpStore(base_url={self.source.base_url!r})"

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings (the source's CA bundle, if any), made on first use: loading a
        CA bundle costs ~20 ms, which a plain ``http://`` endpoint never needs."""
        if self._ssl_context is None:
            cafile = str(self.source.ca_bundle) if self.source.ca_bundle is not None else None
            self._ssl_context = ssl.create_default_context(cafile=cafile)
        return self._ssl_context

    def url(self, key: str = "") -> str:
        """A printable location (``https://…``, or ``s3://bucket/key`` when signed)."""
        return (self.source.display_base or self.source.base_url) + (
            key if self.source.display_base else quote(key)
        )

    def _http_url(self, key: str) -> str:
        return self.source.base_url + quote(key)

    async def __aenter__(self) -> HttpStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._fallback = None
        await self._stack.aclose()

    async def _fallback_store(self) -> Any:
        if self._fallback is None and self._fallback_factory is not None:
            self._fallback = await self._stack.enter_async_context(self._fallback_factory())
        return self._fallback

    # -- plumbing -------------------------------------------------------------------------

    def auth_headers(self, url: str) -> list[tuple[str, str]]:
        """``Authorization`` for the base URL's own origin; nothing for anyone else."""
        parts = urlsplit(url)
        if self.source.token is None or (parts.scheme, parts.netloc) != self._origin:
            return []
        return [("Authorization", f"Bearer {self.source.token.get_secret_value()}")]

    def _request_sync(
        self, method: str, url: str, headers: dict[str, str], max_body: int
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        where = f"{method} {url}"
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self._timeout_s, context=self.ssl_context
            )
        else:
            connection = http.client.HTTPConnection(
                parts.hostname or "", parts.port, timeout=self._timeout_s
            )
        if self.source.signer is not None:
            parts = urlsplit(self.source.signer(method, url))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        sent = {"Accept-Encoding": "identity", "User-Agent": "tplr", **headers}
        sent.update(dict(self.auth_headers(url)))
        try:
            connection.request(method, target or "/", headers=sent)
            answer = connection.getresponse()
            received = {name.lower(): value for name, value in answer.getheaders()}
            body = b"" if method == "HEAD" else answer.read(max_body + 1)
        except ssl.SSLCertVerificationError as exc:
            raise InvalidRequest(
                f"TLS certificate rejected: {where}: {exc.verify_message}",
                location=url,
                hint="a self-signed or private CA needs TPLR_CA_BUNDLE=/path/to/ca.pem",
            ) from None
        except http.client.HTTPException as exc:
            raise MalformedResponse(
                f"{where}: not a valid HTTP answer: {type(exc).__name__}"
            ) from None
        except OSError as exc:  # refused, reset, timed out, DNS
            raise TransientError(
                f"{where} failed: {type(exc).__name__}: {exc}", location=url
            ) from None
        finally:
            connection.close()
        if len(body) > max_body:
            raise MalformedResponse(f"{where}: the answer is larger than {max_body} bytes")
        return answer.status, received, body

    async def _request(
        self, method: str, url: str, headers: dict[str, str] | None = None, max_body: int = 0
    ) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(self._request_sync, method, url, headers or {}, max_body)

    def _error(self, status: int, where: str, key: str) -> StoreError:
        return http_status_error(status, where, self.url(key), auth_hint=self.source.hint)

    async def _follow(self, key: str, method: str, headers: dict[str, str], max_body: int):
        """``method`` the key's URL, following redirects; returns (final URL, answer)."""
        url = self._http_url(key)
        for _hop in range(MAX_REDIRECTS + 1):
            status, answer, body = await self._request(method, url, headers, max_body)
            if status not in _REDIRECTS or self.source.signer is not None:
                return url, status, answer, body
            location = answer.get("location")
            if not location:
                raise MalformedResponse(f"{method} {url}: a redirect without Location")
            try:
                url = urljoin(url, location)
                parts = urlsplit(url)
                parts.port  # noqa: B018  (a bad port raises here)
            except ValueError:
                raise MalformedResponse(f"{method} {url}: a malformed Location") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise MalformedResponse(f"{method} {self.url(key)}: redirected to {url[:80]!r}")
        raise MalformedResponse(f"{method} {self.url(key)}: more than {MAX_REDIRECTS} redirects")

    def _where(self, method: str, key: str, url: str) -> str:
        return f"{method} {self.url(key)}" + (f" (endpoint {url})" if self.source.signer else "")

    # -- reads ----------------------------------------------------------------------------

    def _checked(self, key: str) -> str:
        try:
            return check_key(key, what="key")
        except MalformedInput as exc:
            raise InvalidRequest(exc.message, location=self.url(key)) from None

    async def head(self, key: str) -> ObjectInfo:
        self._checked(key)
        try:
            return await self._head(key)
        except StoreError:
            fallback = await self._fallback_store()
            if fallback is None:
                raise
            info = await fallback.head(key)
            self._final_urls[key] = self._http_url(key)
            return info

    async def _head(self, key: str) -> ObjectInfo:
        url, status, answer, _ = await self._follow(key, "HEAD", {}, 0)
        where = (
            self._where("HEAD", key, self.source.base_url) if self.source.signer else f"HEAD {url}"
        )
        if status in (403, 405, 501) and url != self._http_url(key):
            # a presigned CDN URL may refuse HEAD: ask for byte 0, read the total size
            status, answer, _ = await self._request("GET", url, {"Range": "bytes=0-0"}, 1)
            where = f"GET {url} bytes 0-0"
            if status == 206:
                match = _CONTENT_RANGE_TOTAL.fullmatch(answer.get("content-range", ""))
                if match is None:
                    raise MalformedResponse(f"{where}: Content-Range is not 'bytes 0-0/N'")
                answer["content-length"] = match.group(1)
                status = 200
        if status != 200:
            raise self._error(status, where, key)
        size = content_length(answer, where)
        if size is None:
            raise MalformedResponse(f"{where}: no Content-Length", location=url)
        self._final_urls[key] = url
        return ObjectInfo(
            key=key,
            size=size,
            etag=strong_etag(answer.get("etag")),
            last_modified=parse_http_date(answer.get("last-modified"), where),
        )

    async def presigned_get_url(self, key: str, expires_s: int) -> str:
        """The URL the ranged GETs of ``key`` go to: where its redirects end (signed for
        ``expires_s`` seconds, for a signed source)."""
        if key not in self._final_urls:
            await self.head(key)
        if self.source.signer is not None:
            return self.source.signer("GET", self._final_urls[key])
        return self._final_urls[key]

    def range_reader_options(self, key: str) -> dict[str, Any]:
        """How the engine's raw range reader talks to this store (TLS, auth, errors)."""

        def map_error(status: int, code: str, _message: str) -> StoreError:
            where = self._where("GET", key, self.source.base_url)
            return http_status_error(
                status, where, self.url(key), auth_hint=self.source.hint, code=code
            )

        return {
            "map_error": map_error,
            "ssl_factory": lambda: self.ssl_context,
            "extra_headers": self.auth_headers,
        }

    async def get(self, key: str) -> bytes:
        self._checked(key)
        try:
            return await self._get(key)
        except StoreError:
            fallback = await self._fallback_store()
            if fallback is None:
                raise
            return await fallback.get(key)

    async def _get(self, key: str) -> bytes:
        url, status, answer, body = await self._follow(key, "GET", {}, MAX_SMALL_BODY_BYTES)
        if status != 200:
            raise self._error(status, self._where("GET", key, url), key)
        declared = content_length(answer, f"GET {url}")
        if declared is not None and declared != len(body):
            raise TransientError(
                f"short read: GET {url} returned {len(body)} of {declared} bytes", location=url
            )
        return body

    async def get_range(
        self, key: str, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        if offset < 0:
            raise InvalidRequest(f"negative offset {offset} for {self.url(key)}")
        if not len(into):
            return
        from tplr.comms.download.http import URL_EXPIRES_S, PresignedRangeReader

        await self.presigned_get_url(key, URL_EXPIRES_S)  # resolves the redirects once
        reader = PresignedRangeReader(
            lambda: self.presigned_get_url(key, URL_EXPIRES_S),
            location=self.url(key),
            connect_timeout_s=min(self._timeout_s, 30.0),
            read_timeout_s=self._timeout_s,
            **self.range_reader_options(key),
        )
        async with reader:
            await reader.read_into(offset, into, if_match=if_match)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        try:
            check_prefix(prefix)
        except MalformedInput as exc:
            raise InvalidRequest(exc.message) from None
        if self.source.tree_api is None:
            raise InvalidRequest(
                f"{self.url(prefix)} cannot be listed (a plain HTTP(S) source)",
                location=self.url(prefix),
                hint="put a manifest.json under the dataset prefix (`tplr manifest DIR`)",
            )
        found: list[ObjectInfo] = []
        url: str | None = self.source.tree_api + quote(prefix.rstrip("/")) + "?recursive=true"
        pages = 0
        while url is not None:
            pages += 1
            if pages > MAX_LISTING_PAGES:
                raise MalformedResponse(f"listing {url}: more than {MAX_LISTING_PAGES} pages")
            entries, url = await self._tree_page(url, prefix)
            found += entries
        for info in sorted(found, key=lambda item: item.key):
            yield info

    async def _tree_page(self, url: str, prefix: str) -> tuple[list[ObjectInfo], str | None]:
        """One page of the hub's tree listing and the URL of the next, if any."""
        status, answer, body = await self._request("GET", url, {}, MAX_LISTING_PAGE_BYTES)
        if status != 200:
            raise http_status_error(status, f"GET {url}", url, auth_hint=self.source.hint)
        try:
            items = load_json(
                body, what=f"listing {url}", max_bytes=MAX_LISTING_PAGE_BYTES, max_depth=4
            )
        except MalformedInput as exc:
            raise MalformedResponse(exc.message, location=url) from None
        if not isinstance(items, list):
            raise MalformedResponse(f"listing {url} is not a JSON list", location=url)
        now = datetime.now(UTC)
        entries = []
        for item in items:
            if not isinstance(item, dict) or item.get("type") != "file":
                continue
            path, size = item.get("path"), item.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise MalformedResponse(f"listing {url}: bad size {size!r:.40}", location=url)
            try:
                check_key(path, what="listed path")
            except MalformedInput as exc:
                raise MalformedResponse(f"listing {url}: {exc.message}", location=url) from None
            if path.startswith(prefix):
                entries.append(ObjectInfo(key=path, size=size, etag="", last_modified=now))
        match = _NEXT_LINK.search(answer.get("link", ""))
        if match is None:
            return entries, None
        try:
            following = urljoin(url, match.group(1))
            if urlsplit(following).scheme not in ("http", "https"):
                raise ValueError("not http(s)")
        except ValueError:
            raise MalformedResponse(f"listing {url}: a malformed next-page link") from None
        return entries, following

    # -- writes: refused ------------------------------------------------------------------

    def _read_only(self, key: str) -> InvalidRequest:
        return InvalidRequest(
            f"{self.url(key)} is a read-only HTTP(S) source",
            location=self.url(key),
            hint="write to an s3:// bucket or a local folder",
        )

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        raise self._read_only(key)

    async def put_if_absent(self, key: str, data: bytes) -> ObjectInfo:
        raise self._read_only(key)

    async def create_multipart(self, key: str) -> str:
        raise self._read_only(key)

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        raise self._read_only(key)

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[CompletedPart]
    ) -> ObjectInfo:
        raise self._read_only(key)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        raise self._read_only(key)

    async def delete(self, key: str) -> None:
        raise self._read_only(key)
