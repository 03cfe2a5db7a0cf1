"""Concurrency slots and reusable buffers: what bounds a transfer's connections and memory.

:class:`TransferSlots` is the concurrency budget: a part request holds one slot while it
runs (never while it sleeps before a retry). Several downloads may share one instance, so
a dataset prefix fetched file by file in parallel still opens at most ``limit``
connections. :class:`BufferPool` lends fixed-size buffers that are reused, so memory is
``slots x buffer size`` whatever the object size.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TransferSlots:
    """``async with slots:`` around one request; at most ``limit`` run at once."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a transfer needs at least one slot, got {limit}")
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self.in_use = 0

    async def __aenter__(self) -> TransferSlots:
        await self._semaphore.acquire()
        self.in_use += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.in_use -= 1
        self._semaphore.release()


class BufferPool:
    """At most ``count`` buffers of ``size_bytes``, allocated on first use and reused."""

    def __init__(self, count: int, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self._free: list[bytearray] = []
        self._available = asyncio.Semaphore(count)
        self.allocated = 0

    @contextlib.asynccontextmanager
    async def buffer(self) -> AsyncIterator[memoryview]:
        async with self._available:
            buf = self._free.pop() if self._free else self._allocate()
            try:
                with memoryview(buf) as view:
                    yield view
            finally:
                self._free.append(buf)

    def _allocate(self) -> bytearray:
        self.allocated += 1
        return bytearray(self.size_bytes)
