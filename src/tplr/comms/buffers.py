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
import functools
from collections.abc import AsyncIterator
from typing import Any


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


class FreshBytes:
    """A ``bytes`` object to be received into: fill :attr:`view`, then :meth:`take` it.

    A peer's payload ends up as ``bytes`` (what the validator reads). Receiving into a
    buffer and copying that into ``bytes`` costs a second pass over every byte and a
    second set of page faults (measured: a third of a window's gather). Instead the
    ``bytes`` is made first with its contents uninitialised, the way the C API offers it
    to a creator who fills it before anyone else sees it (``PyBytes_FromStringAndSize(NULL,
    n)``, as ``os.read`` does), reached through ``ctypes``; the socket then receives
    straight into its memory. Where ``ctypes`` cannot reach the C API (another
    interpreter), a ``bytearray`` is filled and copied once. Until :meth:`take` nobody
    but the filler holds the object; a failure simply drops it.
    """

    def __init__(self, size: int) -> None:
        self._bytes: bytes | None = None
        self._array: bytearray | None = None
        api = _bytes_c_api()
        if api is None or size == 0:
            self._array = bytearray(size)
            self.view = memoryview(self._array)
            return
        make, address_of, char = api
        self._bytes = make(None, size)
        self.view = memoryview((char * size).from_address(address_of(self._bytes))).cast("B")

    def take(self) -> bytes:
        """The filled bytes (the view is released)."""
        self.view.release()
        if self._bytes is not None:
            return self._bytes
        assert self._array is not None
        return bytes(self._array)


@functools.cache
def _bytes_c_api() -> tuple[Any, Any, Any] | None:
    """``PyBytes_FromStringAndSize``, ``PyBytes_AsString`` and ``c_char``, or None where
    ctypes cannot reach the C API."""
    try:
        import ctypes

        api = ctypes.pythonapi
        make = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
            ("PyBytes_FromStringAndSize", api)
        )
        address_of = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object)(("PyBytes_AsString", api))
    except (ImportError, AttributeError, OSError):
        return None
    return make, address_of, ctypes.c_char
