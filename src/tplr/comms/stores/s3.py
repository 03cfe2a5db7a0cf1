"""``S3Store``: the :class:`~tplr.comms.stores.base.ObjectStore` for R2, AWS S3, MinIO, any S3 API.

One long-lived aiobotocore client (the engine under aioboto3) per store: one credential
set, one bucket; all stores share one botocore session, so its models load once. Opened by
``async with S3Store(...) as store:``. Every method makes exactly one attempt: botocore's
own retries are off, and retries happen only in :mod:`tplr.comms.retry` (callers). Every
request passes through the store's :class:`~tplr.comms.stores.throttle.AdaptiveThrottle`, which
is told to slow down whenever the server throttles us.

Failures are translated by :func:`map_s3_error` into the typed errors of
:mod:`tplr.comms.errors`; messages name ``s3://bucket/key`` and the endpoint, never a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    DataNotFoundError,
    IncompleteReadError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from tplr.comms.config import BucketConfig
from tplr.comms.errors import (
    AccessDenied,
    AlreadyExists,
    InvalidRequest,
    MalformedResponse,
    NotFound,
    PreconditionFailed,
    StoreError,
    Throttled,
    TransientError,
)
from tplr.comms.stores.base import CompletedPart, ObjectInfo
from tplr.comms.stores.s3_fields import (
    ANSWER_PARSE_FAILURES,
    answer_etag,
    answer_size,
    answer_text,
    answer_time,
    page_objects,
)
from tplr.comms.stores.sigv4 import object_url, presign_url
from tplr.comms.stores.throttle import AdaptiveThrottle
from tplr.comms.transfer_config import TransferConfig

log = logging.getLogger(__name__)

_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded"}
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "AllAccessDisabled",
    }
)
_TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted", "BadDigest"}
)
_NOT_FOUND_WHAT = {"NoSuchBucket": "bucket", "NoSuchUpload": "multipart upload"}
# Exceptions raised while talking to the endpoint that map_s3_error understands.
S3_FAILURES = (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _client_error(exc: ClientError, *, location: str, endpoint: str, operation: str) -> StoreError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"HTTP {status}" if code in ("", str(status)) else f"HTTP {status} {code}"
    if error.get("Message"):
        detail += f": {error['Message']}"
    where = f"{operation} {location} (endpoint {endpoint})"
    if code in _THROTTLE_CODES or status == 429:
        return Throttled(f"{where} was throttled: {detail}", location=location)
    if code in _NOT_FOUND_WHAT or code in ("NoSuchKey", "NotFound") or status == 404:
        what = _NOT_FOUND_WHAT.get(code, "key")
        if what == "bucket":
            bucket = location.removeprefix("s3://").split("/", 1)[0]
            message = f"bucket {bucket!r} does not exist at {endpoint} ({operation} {location})"
        else:
            message = f"{what} not found: {where}: {detail}"
        return NotFound(message, location=location)
    if code in _ACCESS_CODES or status == 403:
        hint = None
        if code == "RequestTimeTooSkewed":
            hint = "this machine's clock is wrong; enable NTP time sync"
        return AccessDenied(f"access denied: {where}: {detail}", location=location, hint=hint)
    if code == "PreconditionFailed" or status == 412:
        return PreconditionFailed(f"object changed: {where}: {detail}", location=location)
    if code in _TRANSIENT_CODES or status >= 500 or status == 408:
        return TransientError(f"{where} failed: {detail}", location=location)
    if code == "InvalidRange" or status == 416:
        return InvalidRequest(
            f"range not satisfiable: {where}: {detail}",
            location=location,
            hint="the offset lies beyond the end of the object; HEAD it for its size",
        )
    if 400 <= status < 500:
        return InvalidRequest(f"request rejected: {where}: {detail}", location=location)
    return StoreError(f"{where} failed: {detail}", location=location)


def map_s3_error(exc: BaseException, *, location: str, endpoint: str, operation: str) -> StoreError:
    """Translate any failure of an S3 request into a typed :class:`StoreError`.

    Decided by error codes, HTTP status and exception types, never by message text.
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, ClientError):
        return _client_error(exc, location=location, endpoint=endpoint, operation=operation)
    where = f"{operation} {location} (endpoint {endpoint})"
    name = type(exc).__name__
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(f"invalid request: {where}: {exc}", location=location)
    if isinstance(exc, SSLError) and isinstance(
        exc.kwargs.get("error"), aiohttp.ClientConnectorCertificateError
    ):
        return InvalidRequest(
            f"TLS certificate rejected: {where}: {exc}",
            location=location,
            hint="check the endpoint URL; a self-signed endpoint needs its CA installed",
        )
    if isinstance(exc, asyncio.TimeoutError | ReadTimeoutError):
        return TransientError(f"timed out: {where} ({name})", location=location)
    transient = (
        BotoConnectionError,
        ResponseStreamingError,
        IncompleteReadError,
        aiohttp.ClientError,
        OSError,
    )
    if isinstance(exc, transient):
        return TransientError(f"connection failed: {where}: {name}: {exc}", location=location)
    return StoreError(f"{where} failed: {name}: {exc}", location=location)


def _unquote(etag: str) -> str:
    return etag.strip().strip('"')


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _server_time(response: dict[str, Any]) -> datetime:
    """The server's ``Date`` header (what S3 stamps as LastModified), else local time."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return _utc(email.utils.parsedate_to_datetime(date))
    return datetime.now(UTC)


def client_config(transfer: TransferConfig, max_connections: int) -> AioConfig:
    """botocore settings for R2 and friends: one attempt, pooled connections, timeouts,
    unsigned payloads."""
    return AioConfig(
        max_pool_connections=max_connections,
        connect_timeout=transfer.transfer_connect_timeout_s,
        read_timeout=transfer.transfer_read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        signature_version="s3v4",
        # No SHA-256 of every body on the event loop: botocore would otherwise hash each
        # part (also over https, as no checksum header is sent). TLS protects the bytes
        # in transit and the uploader checks every part's MD5 ETag.
        s3={"addressing_style": "path", "payload_signing_enabled": False},
    )


_session: AioSession | None = None
_session_ready = False


async def _shared_session() -> AioSession:
    """One botocore session per process, so its JSON models (megabytes) are parsed once,
    and the first time in a worker thread rather than on the event loop."""
    global _session, _session_ready
    if _session is None:
        _session = get_session()
    if not _session_ready:
        await asyncio.to_thread(_load_models, _session)
        _session_ready = True
    return _session


def _load_models(session: AioSession) -> None:
    loader = session.get_component("data_loader")
    try:
        loader.load_service_model("s3", "service-2")
        loader.load_service_model("s3", "endpoint-rule-set-1")
        loader.load_data("endpoints")
        loader.load_data("partitions")
    except DataNotFoundError as exc:  # another botocore layout: clients load what they need
        log.debug("botocore models not preloaded: %s", exc)


class S3Store:
    """A bucket behind an S3 API endpoint. Use as ``async with S3Store(...) as store``."""

    def __init__(
        self,
        bucket: BucketConfig,
        transfer: TransferConfig | None = None,
        *,
        max_connections: int = 16,
        throttle: AdaptiveThrottle | None = None,
        list_page_size: int = 1000,
    ) -> None:
        self.bucket = bucket
        self.bucket_name = bucket.bucket_name
        self.endpoint = bucket.resolved_endpoint()
        self._transfer = transfer or TransferConfig()
        self._max_connections = max_connections
        self.throttle = throttle or AdaptiveThrottle(bucket.requests_per_second)
        self._list_page_size = list_page_size
        self._bucket_exists = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_obj: Any = None

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket_name!r}, endpoint={self.endpoint!r})"

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket_name}/{key}"

    async def __aenter__(self) -> S3Store:
        if self._client_obj is not None:
            return self
        session = await _shared_session()
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=self.endpoint,
                    region_name=self.bucket.region,
                    aws_access_key_id=self.bucket.access_key_id.get_secret_value(),
                    aws_secret_access_key=self.bucket.secret_access_key.get_secret_value(),
                    config=client_config(self._transfer, self._max_connections),
                )
            )
            self._stack = stack.pop_all()
        self._client_obj = client
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack, self._client_obj = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            raise RuntimeError("S3Store used outside 'async with S3Store(...) as store'")
        return self._client_obj

    @contextlib.asynccontextmanager
    async def _request(self, operation: str, key: str) -> AsyncIterator[None]:
        """One throttled request; failures leave as typed errors (throttling slows us).

        The block holds only the client call: a ``ValueError`` or ``KeyError`` there is
        botocore failing to parse what the endpoint sent (a bad date, a bad number,
        broken XML), which is the endpoint's fault and becomes ``MalformedResponse``.
        """
        self._client  # noqa: B018  (raises if used outside ``async with``, before the try)
        async with self.throttle:
            try:
                yield
                self._bucket_exists = True
            except ANSWER_PARSE_FAILURES as exc:
                raise MalformedResponse(
                    f"{operation} {self.url(key)} (endpoint {self.endpoint}): the answer could"
                    f" not be parsed: {type(exc).__name__}: {str(exc)[:200]}",
                    location=self.url(key),
                ) from exc
            except S3_FAILURES as exc:
                error = map_s3_error(
                    exc, location=self.url(key), endpoint=self.endpoint, operation=operation
                )
                if isinstance(error, Throttled):
                    self.throttle.slow_down()
                if error is exc:
                    raise
                raise error from exc

    async def head(self, key: str) -> ObjectInfo:
        try:
            async with self._request("HEAD", key):
                response = await self._client.head_object(Bucket=self.bucket_name, Key=key)
        except NotFound:
            await self._raise_if_bucket_missing(key)
            raise
        where = f"HEAD {self.url(key)} (endpoint {self.endpoint})"
        return ObjectInfo(
            key=key,
            size=answer_size(response, "ContentLength", where),
            etag=answer_etag(response, where),
            last_modified=answer_time(response, "LastModified", where),
        )

    async def _raise_if_bucket_missing(self, key: str) -> None:
        """A HEAD 404 has no body: ask the bucket itself so the error says which is missing.

        Only a missing bucket is raised; any other answer (e.g. keys that may not
        HeadBucket) leaves the caller's original "key not found" error standing. Once a
        request has succeeded the bucket is known to exist, so polling for a key that is
        not there yet costs one request, not two.
        """
        if self._bucket_exists:
            return
        try:
            async with self._request("HEAD bucket", key):
                await self._client.head_bucket(Bucket=self.bucket_name)
        except NotFound as exc:
            raise NotFound(
                f"bucket {self.bucket_name!r} does not exist at {self.endpoint}"
                f" (HEAD {self.url(key)})",
                location=self.url(key),
            ) from exc
        except StoreError as exc:
            log.debug("could not tell whether bucket %s exists: %s", self.bucket_name, exc)

    async def get_range(
        self, key: str, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        received = 0
        async with self.open_range(key, offset, len(into), if_match=if_match) as chunks:
            async for chunk in chunks:
                into[received : received + len(chunk)] = chunk
                received += len(chunk)

    @contextlib.asynccontextmanager
    async def open_range(
        self, key: str, offset: int, length: int, *, if_match: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream ``[offset, offset + length)`` with one ranged GET, in the chunks the socket
        delivers: ``async with store.open_range(k, 0, n) as chunks: async for c in chunks``.

        Exactly ``length`` bytes arrive, else the iteration raises ``TransientError``
        (short body); ``PreconditionFailed`` if the ETag is not ``if_match``. Errors that
        the caller's own loop body raises pass through untouched.
        """
        if offset < 0 or length < 0:
            raise InvalidRequest(f"invalid range {offset}+{length} for {self.url(key)}")
        if length == 0:  # "bytes=N-(N-1)" is not a valid range: check the object instead
            await self._check_if_match(key, if_match)
            yield _BodyChunks(None, 0, "", self.url(key), self.endpoint)
            return
        where = f"GET {self.url(key)} bytes {offset}-{offset + length - 1}"
        extra = {"IfMatch": f'"{_unquote(if_match)}"'} if if_match is not None else {}
        async with self._request("GET", key):
            response = await self._client.get_object(
                Bucket=self.bucket_name,
                Key=key,
                Range=f"bytes={offset}-{offset + length - 1}",
                **extra,
            )
        async with response["Body"] as body:  # released, or closed if not read to the end
            self._check_range_answer(response, offset, length, where, key)
            yield _BodyChunks(body.content, length, where, self.url(key), self.endpoint)

    async def _check_if_match(self, key: str, if_match: str | None) -> None:
        info = await self.head(key)
        if if_match is not None and info.etag != _unquote(if_match):
            raise PreconditionFailed(
                f"object changed: {self.url(key)} has ETag {info.etag}, expected {if_match}",
                location=self.url(key),
            )

    def _check_range_answer(
        self, response: dict[str, Any], offset: int, length: int, where: str, key: str
    ) -> None:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        declared = answer_size(response, "ContentLength", where)
        if declared > length or (offset > 0 and status != 206):
            raise InvalidRequest(
                f"endpoint {self.endpoint} ignored the Range header of {where}"
                f" (HTTP {status}, {declared} bytes)",
                location=self.url(key),
                hint="use an S3-compatible endpoint that supports ranged GETs",
            )
        content_range = response.get("ContentRange")
        # the range may end early at the object's end (the short body is then an error
        # of its own); a range that starts elsewhere would put bytes in the wrong place
        expected = f"bytes {offset}-"
        if status == 206 and not (
            isinstance(content_range, str) and content_range.startswith(expected)
        ):
            raise MalformedResponse(
                f"{where} answered Content-Range {str(content_range)[:80]!r}",
                location=self.url(key),
            )

    async def get(self, key: str) -> bytes:
        async with self._request("GET", key):
            response = await self._client.get_object(Bucket=self.bucket_name, Key=key)
            async with response["Body"] as body:
                data = await body.read()
        where = f"GET {self.url(key)} (endpoint {self.endpoint})"
        expected = answer_size(response, "ContentLength", where, default=len(data))
        if len(data) != expected:
            raise TransientError(
                f"short read: GET {self.url(key)} returned {len(data)} of {expected} bytes",
                location=self.url(key),
            )
        return data

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        async with self._request("PUT", key):
            response = await self._client.put_object(Bucket=self.bucket_name, Key=key, Body=data)
        return ObjectInfo(
            key=key,
            size=len(data),
            etag=answer_etag(response, f"PUT {self.url(key)} (endpoint {self.endpoint})"),
            last_modified=_server_time(response),
        )

    async def presigned_get_url(self, key: str, expires_s: int) -> str:
        """A URL that GETs ``key`` without credentials for ``expires_s`` seconds (SigV4 query
        auth, path style, as the client would sign it: :mod:`tplr.comms.stores.sigv4`, checked
        against botocore's signatures). ``Range`` and ``If-Match`` headers may be added;
        they are not signed."""
        return presign_url(
            "GET",
            object_url(self.endpoint, self.bucket_name, key),
            access_key_id=self.bucket.access_key_id,
            secret_access_key=self.bucket.secret_access_key,
            region=self.bucket.region,
            expires_s=expires_s,
        )

    async def put_if_absent(self, key: str, data: bytes) -> ObjectInfo:
        """``PutObject`` with ``If-None-Match: *`` (AWS S3 and R2 honour it)."""
        try:
            async with self._request("PUT if absent", key):
                response = await self._client.put_object(
                    Bucket=self.bucket_name, Key=key, Body=data, IfNoneMatch="*"
                )
        except PreconditionFailed as exc:
            raise AlreadyExists(f"{self.url(key)} already exists", location=exc.location) from None
        return ObjectInfo(
            key=key,
            size=len(data),
            etag=answer_etag(response, f"PUT {self.url(key)} (endpoint {self.endpoint})"),
            last_modified=_server_time(response),
        )

    async def create_multipart(self, key: str) -> str:
        async with self._request("CreateMultipartUpload", key):
            response = await self._client.create_multipart_upload(Bucket=self.bucket_name, Key=key)
        where = f"CreateMultipartUpload {self.url(key)} (endpoint {self.endpoint})"
        return answer_text(response, "UploadId", where)

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        async with self._request(f"UploadPart {part_number}", key):
            response = await self._client.upload_part(
                Bucket=self.bucket_name,
                Key=key,
                UploadId=upload_id,
                PartNumber=part_number,
                Body=data,
            )
        return answer_etag(response, f"UploadPart {part_number} {self.url(key)}")

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[CompletedPart]
    ) -> ObjectInfo:
        listed = [{"PartNumber": p.part_number, "ETag": f'"{p.etag}"'} for p in parts]
        async with self._request("CompleteMultipartUpload", key):
            await self._client.complete_multipart_upload(
                Bucket=self.bucket_name,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
            )
        # The completion response carries neither size nor date: one HEAD gives both.
        return await self.head(key)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload. Idempotent: an upload (or bucket) that no longer exists is
        already in the state abort asks for, so ``NotFound`` is not an error here."""
        with contextlib.suppress(NotFound):
            async with self._request("AbortMultipartUpload", key):
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket_name, Key=key, UploadId=upload_id
                )

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix`` in key order. The answers are checked as they come
        (see :func:`tplr.comms.stores.s3_fields.page_objects`): keys under the prefix, strictly
        ascending across pages, no repeated continuation token, so a hostile endpoint
        cannot make a listing go round in circles."""
        token: str | None = None
        after: str | None = None
        seen_tokens: set[str] = set()
        where = f"LIST {self.url(prefix)} (endpoint {self.endpoint})"
        while True:
            extra = {"ContinuationToken": token} if token else {}
            async with self._request("LIST", prefix):
                page = await self._client.list_objects_v2(
                    Bucket=self.bucket_name, Prefix=prefix, MaxKeys=self._list_page_size, **extra
                )
            for info in page_objects(page, prefix, after, where):
                after = info.key
                yield info
            token = page.get("NextContinuationToken")
            if page.get("IsTruncated") is not True or not token:
                return
            if not isinstance(token, str) or token in seen_tokens or len(token) > 4096:
                raise MalformedResponse(
                    f"{where}: the continuation token repeats or is invalid", location=where
                )
            seen_tokens.add(token)

    async def delete(self, key: str) -> None:
        async with self._request("DELETE", key):
            await self._client.delete_object(Bucket=self.bucket_name, Key=key)


class _BodyChunks:
    """The body of a ranged GET as ``bytes`` chunks: exactly ``length`` bytes, or a typed
    error. Failures of the connection are mapped here, where they happen, so that the
    caller's own errors (a full disk, say) are never mistaken for network trouble."""

    def __init__(self, content: Any, length: int, where: str, location: str, endpoint: str):
        self._content = content  # the aiohttp StreamReader
        self._length = self._remaining = length
        self._where, self._location, self._endpoint = where, location, endpoint

    def __aiter__(self) -> _BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._remaining == 0:
            raise StopAsyncIteration
        try:
            chunk = await self._content.readany()
        except S3_FAILURES as exc:
            raise map_s3_error(
                exc, location=self._location, endpoint=self._endpoint, operation="GET"
            ) from exc
        if not chunk:
            raise TransientError(
                f"short read: {self._where} ended after {self._length - self._remaining} of"
                f" {self._length} bytes (endpoint {self._endpoint})",
                location=self._location,
            )
        if len(chunk) > self._remaining:
            raise InvalidRequest(
                f"{self._where} returned more bytes than the range asked for",
                location=self._location,
            )
        self._remaining -= len(chunk)
        return chunk
