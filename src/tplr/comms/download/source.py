"""Where a part's bytes come from, fastest first.

1. A store that can presign a GET URL (``S3Store``, ``HttpStore``): ranged GETs of that
   one URL on kept-alive connections, each received by a worker thread that also writes
   it (:mod:`tplr.comms.download.http`): one request per part, no copy in user space.
   Not used when ``HTTP(S)_PROXY`` routes the endpoint through a proxy.
2. A store that streams a range (:class:`RangeStreamingStore`, ``open_range``): one
   request per part, its body in the chunks the socket delivers.
3. Any :class:`~tplr.comms.stores.base.ObjectStore`: ``get_range`` into a buffer lent by a
   :class:`~tplr.comms.buffers.BufferPool`, one buffer-sized request at a time (the
   local store; memory stays ``slots x buffer``).
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from tplr.comms.buffers import BufferPool, FreshBytes
from tplr.comms.download.http import URL_EXPIRES_S, PresignedRangeReader
from tplr.comms.errors import StoreError, Throttled
from tplr.comms.stores.base import ObjectInfo, ObjectStore
from tplr.comms.transfer_config import TransferConfig

Chunk = bytes | memoryview
"""``bytes`` chunks may be kept; a ``memoryview`` is only valid until the next chunk."""

RangeOpener = Callable[..., AbstractAsyncContextManager[AsyncIterator[Chunk]]]
"""``opener(key, offset, length, if_match=...)``: ``async with`` it to iterate chunks."""


@runtime_checkable
class RangeStreamingStore(Protocol):
    """Optional store capability: stream ``[offset, offset + length)`` in one request."""

    def open_range(
        self, key: str, offset: int, length: int, *, if_match: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


@runtime_checkable
class PresigningStore(Protocol):
    """Optional store capability: a URL that GETs ``key`` without credentials until it
    expires, plus what the range reader needs to behave like the store."""

    async def presigned_get_url(self, key: str, expires_s: int) -> str: ...


def _proxied(store: ObjectStore) -> bool:
    """True when the environment routes the store's endpoint through an HTTP proxy (which
    the store's own client honours and the raw reader does not)."""
    endpoint = getattr(store, "endpoint", "")
    parts = urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    return bool(
        parts.hostname
        and proxies.get(parts.scheme)
        and not urllib.request.proxy_bypass(parts.hostname)
    )


def _presigner(store: ObjectStore) -> Callable[[str, int], Awaitable[str]] | None:
    if _proxied(store):
        return None
    if isinstance(store, PresigningStore):
        return store.presigned_get_url
    return None


def _s3_error_mapper(store: Any, key: str) -> Callable[[int, str, str], StoreError]:
    """Map an error answer exactly as the S3 store maps its own (and slow its throttle)."""
    from botocore.exceptions import ClientError

    from tplr.comms.stores.s3 import map_s3_error

    def map_error(status: int, code: str, message: str) -> StoreError:
        response = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        error = map_s3_error(
            ClientError(response, "GetObject"),  # type: ignore[arg-type]
            location=store.url(key),
            endpoint=getattr(store, "endpoint", "?"),
            operation="GET",
        )
        if isinstance(error, Throttled) and getattr(store, "throttle", None) is not None:
            store.throttle.slow_down()
        return error

    return map_error


def _presigned_reader(
    store: ObjectStore, key: str, config: TransferConfig, executor: Executor | None = None
) -> PresignedRangeReader | None:
    presign = _presigner(store)
    if presign is None:
        return None
    custom = getattr(store, "range_reader_options", None)  # HttpStore: its own TLS, auth
    options = custom(key) if custom is not None else {"map_error": _s3_error_mapper(store, key)}
    return PresignedRangeReader(
        lambda: presign(key, URL_EXPIRES_S),
        location=store.url(key),
        connect_timeout_s=config.transfer_connect_timeout_s,
        read_timeout_s=config.transfer_read_timeout_s,
        throttle=getattr(store, "throttle", None),
        executor=executor,
        **options,
    )


@dataclass(frozen=True, slots=True)
class RangeSource:
    """How a download gets its parts: ``reader`` (presigned GETs received and written by
    worker threads), else ``opener`` (a store's streamed ranges), else neither
    (``get_range`` into pooled buffers)."""

    reader: PresignedRangeReader | None = None
    opener: RangeOpener | None = None


@contextlib.asynccontextmanager
async def range_source(
    store: ObjectStore, key: str, config: TransferConfig, *, streams: int
) -> AsyncIterator[RangeSource]:
    """The fastest way ``store`` offers to fetch ranges of ``key``, for up to ``streams``
    concurrent requests."""
    with ThreadPoolExecutor(streams, thread_name_prefix="tplr-stream") as threads:
        reader = _presigned_reader(store, key, config, threads)
        if reader is not None:
            async with reader:
                yield RangeSource(reader=reader)
            return
    if isinstance(store, RangeStreamingStore):
        yield RangeSource(opener=store.open_range)
        return
    yield RangeSource()


async def _via_get_range(
    store: ObjectStore, key: str, offset: int, length: int, if_match: str | None, pool: BufferPool
) -> AsyncIterator[Chunk]:
    async with pool.buffer() as buffer:
        done = 0
        while done < length:
            view = buffer[: min(len(buffer), length - done)]
            await store.get_range(key, offset + done, view, if_match=if_match)
            yield view
            done += len(view)


@contextlib.asynccontextmanager
async def open_part_stream(
    store: ObjectStore,
    key: str,
    offset: int,
    length: int,
    *,
    if_match: str | None,
    pool: BufferPool,
    opener: RangeOpener | None,
) -> AsyncIterator[AsyncIterator[Chunk]]:
    """``async with open_part_stream(...) as chunks: async for chunk in chunks: ...``."""
    if opener is not None:
        async with opener(key, offset, length, if_match=if_match) as chunks:
            yield chunks
        return
    async with contextlib.aclosing(
        _via_get_range(store, key, offset, length, if_match, pool)
    ) as chunks:
        yield chunks


async def fetch_whole_object(
    store: ObjectStore,
    key: str,
    *,
    check: Callable[[ObjectInfo], None],
    config: TransferConfig | None = None,
) -> tuple[bytes, ObjectInfo]:
    """A whole (small) object and its info, in one GET where the store presigns (a peer's
    payload: no HEAD, the body received in a worker thread); ``check`` sees the info first
    and may refuse the object by raising, before a byte of its body is read. Other stores:
    HEAD, ``check``, then :func:`read_object` pinned to the HEAD's ETag."""
    reader = _presigned_reader(store, key, config or TransferConfig.model_construct())
    if reader is None:
        info = await store.head(key)
        check(info)
        return await read_object(store, info, config=config), info
    async with reader:
        return await reader.fetch_whole(key, check)


async def read_object(
    store: ObjectStore, info: ObjectInfo, *, config: TransferConfig | None = None
) -> bytes:
    """The whole object ``info`` describes, in one ranged GET pinned to its ETag, by the
    fastest source the store offers (a peer's payload: a few MiB, fetched many at once).

    The body is received straight into the ``bytes`` returned (no copy,
    :class:`~tplr.comms.buffers.FreshBytes`). ``PreconditionFailed`` if the object was
    replaced since ``info`` was read, a typed error for anything else.
    """
    if not info.size:
        return b""
    reader = _presigned_reader(store, info.key, config or TransferConfig.model_construct())
    fresh = FreshBytes(info.size)
    with fresh.view:
        if reader is None:
            await store.get_range(info.key, 0, fresh.view, if_match=info.etag)
        else:
            async with reader:
                await reader.read_into(0, fresh.view, if_match=info.etag)
    return fresh.take()
