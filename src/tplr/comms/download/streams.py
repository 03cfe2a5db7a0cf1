"""Adaptive concurrency: how many ranged GETs of one download run at once, and how much
each one asks for.

Requests wait in offset order; each stream takes the next one when it is free, so parts
complete roughly in order (what a killed download has written is a prefix of the object,
plus one part in progress per stream, not every part 75 % done). The download starts
with a few streams and doubles them every ``interval_s`` while the aggregate throughput
grows by at least ``min_gain`` per doubling (and quadruples them while it grows almost in
proportion, so a per-connection-limited origin gets its streams in a few tenths of a
second): an origin that limits each connection (one R2 stream across a WAN, nginx
``limit_rate``) gets many streams, a fast loopback or LAN keeps few. The streams also stop
growing while this process keeps most of the machine's cores busy (measured, on 2 cores
against a loopback origin: 8 streams finish 1 GiB ~10 % sooner than 32, with ~20 % less
CPU; more streams only add contention there). ``max_streams`` caps it
(``DOWNLOAD_MAX_WORKERS``, or one per request up to 128).

Once the streams have settled, a stream may take several consecutive requests at once
(``take(queue, share)``, with ``share`` its fair share of what is left): fewer, larger
GETs, which is what a fast origin wants (measured: 32 MiB GETs instead of 8 MiB ones,
~10 % sooner); an origin that limits each connection keeps one request per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
INITIAL_STREAMS = 8
GROWTH_INTERVAL_S = 0.1
MIN_GAIN = 1.2  # a doubling of the streams must bring >= 20 % more throughput to go on
LINEAR_GAIN = 1.6  # a doubling that nearly doubled the throughput: grow 4x next time
BUSY_CPU_FRACTION = 0.6  # of the usable cores: more streams would only add contention
IDLE_CPU_FRACTION = 0.3  # the first streams left the cores this idle: grow 4x at once


def usable_cores() -> int:
    """The cores this process may run on (its affinity, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class AdaptiveStreams(Generic[T, U]):
    """``await AdaptiveStreams(queue, run, take=...).run()`` runs every queued item.

    ``take(queue, share)`` pops the next unit of work (one item, or up to ``share``
    consecutive ones joined); ``run(unit)`` does it, and may append items to ``queue`` (a
    part to fetch again); the stream that did so keeps going, so an item is never left
    without a stream. The first exception stops every stream and propagates (task-group
    semantics).
    """

    def __init__(
        self,
        queue: deque[T],
        run: Callable[[U], Awaitable[None]],
        *,
        take: Callable[[deque[T], int], U],
        max_streams: int,
        bytes_done: Callable[[], int],
        initial_streams: int = INITIAL_STREAMS,
        interval_s: float = GROWTH_INTERVAL_S,
        min_gain: float = MIN_GAIN,
        cpu_seconds: Callable[[], float] = process_cpu_seconds,
        cores: int | None = None,
    ) -> None:
        self.queue = queue
        self._run = run
        self._take = take
        self.max_streams = max(1, max_streams)
        self._bytes_done = bytes_done
        self._initial = max(1, min(initial_streams, self.max_streams))
        self._interval_s = interval_s
        self._min_gain = min_gain
        self._cpu_seconds = cpu_seconds
        self._cores = cores or usable_cores()
        self.streams = 0  # started so far
        self.peak_streams = 0
        self.settled = False  # more streams did not pay: each may take several requests
        self._active = 0
        self._all_done = asyncio.Event()

    async def run(self) -> None:
        if not self.queue:
            return
        async with asyncio.TaskGroup() as group:
            for _ in range(min(self._initial, len(self.queue))):
                self._start(group)
            if self.streams < self.max_streams:
                group.create_task(self._grow(group))
        log.debug("download used %d streams at most", self.peak_streams)

    def _start(self, group: asyncio.TaskGroup) -> None:
        self.streams += 1
        self._active += 1
        self.peak_streams = max(self.peak_streams, self._active)
        group.create_task(self._stream())

    async def _stream(self) -> None:
        try:
            while self.queue:
                share = max(1, len(self.queue) // self._active) if self.settled else 1
                await self._run(self._take(self.queue, share))
        finally:
            self._active -= 1
            if self._active == 0:
                self._all_done.set()

    async def _grow(self, group: asyncio.TaskGroup) -> None:
        """Double the streams while that pays (see the module doc); when it stops paying
        (not when the cap is reached: a per-connection limit wants every request it can
        get), the streams are settled. Streams just started may need a moment to connect
        and get going (many at once, on a busy machine): a growth that shows no gain yet
        gets one more interval before the streams settle."""
        before: float | None = None  # the rate before the last growth
        patience = 1
        last_bytes, last_time, last_cpu = self._bytes_done(), time.monotonic(), self._cpu_seconds()
        while self.queue and self.streams < self.max_streams:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._all_done.wait()
            if self._all_done.is_set() or not self.queue:
                return
            now, done, cpu = time.monotonic(), self._bytes_done(), self._cpu_seconds()
            elapsed = max(now - last_time, 1e-6)
            rate, busy = (done - last_bytes) / elapsed, (cpu - last_cpu) / elapsed / self._cores
            last_bytes, last_time, last_cpu = done, now, cpu
            if busy >= BUSY_CPU_FRACTION:
                log.debug(
                    "streams settled at %d: %.0f%% of the cores busy", self._active, 100 * busy
                )
                self.settled = True
                return
            if before is not None and rate < before * self._min_gain:
                if patience:
                    patience -= 1
                    continue
                log.debug("streams settled at %d (%.1f MB/s)", self._active, rate / 1e6)
                self.settled = True
                return
            if before is None:  # no growth measured yet: the cores say how far to go
                factor = 4 if busy < IDLE_CPU_FRACTION else 2
            else:
                factor = 4 if rate >= before * LINEAR_GAIN else 2
            before, patience = rate, 1
            more = (factor - 1) * self._active
            for _ in range(min(more, self.max_streams - self.streams, len(self.queue))):
                self._start(group)
