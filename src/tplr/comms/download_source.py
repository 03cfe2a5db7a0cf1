"""Where a part's bytes come from: one streamed ranged GET, or buffer-sized ``get_range`` calls.

A store that can stream a range implements :class:`RangeStreamingStore` (``open_range``):
the part is one request and its body arrives in socket-sized ``bytes`` chunks, so memory
stays small even for 64 MiB parts and the request's latency is paid once per part. Any
other :class:`~tplr.comms.store.ObjectStore` is read through ``get_range`` into a buffer
lent by a :class:`~tplr.comms.buffers.BufferPool`, one buffer-sized request at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from tplr.comms.buffers import BufferPool
from tplr.comms.store import ObjectStore

Chunk = bytes | memoryview
"""``bytes`` chunks may be kept; a ``memoryview`` is only valid until the next chunk."""

RangeOpener = Callable[..., AbstractAsyncContextManager[AsyncIterator[bytes]]]


@runtime_checkable
class RangeStreamingStore(Protocol):
    """Optional store capability: stream ``[offset, offset + length)`` in one request."""

    def open_range(
        self, key: str, offset: int, length: int, *, if_match: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Yield exactly ``length`` bytes as ``bytes`` chunks, or raise a typed error:
        ``TransientError`` for a short body, ``PreconditionFailed`` if the ETag is not
        ``if_match``."""
        ...


def range_opener(store: ObjectStore) -> RangeOpener | None:
    """The store's streaming GET, if it has one."""
    if isinstance(store, RangeStreamingStore):
        return store.open_range
    from tplr.comms.s3_store import S3Store

    if isinstance(store, S3Store):  # until S3Store.open_range lands (see the _tmp module)
        from tplr.comms.download_s3_stream_tmp import open_s3_range

        return lambda key, offset, length, *, if_match=None: open_s3_range(
            store, key, offset, length, if_match=if_match
        )
    return None


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
