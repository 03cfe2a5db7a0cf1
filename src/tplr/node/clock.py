"""Time: an injectable clock source and the window clock every node agrees on.

``window = floor((now - genesis) / window_seconds)``, computed from the run's
``run.json``; nothing depends on a local counter, so a restarted node lands in the
right window. All waiting goes through :meth:`Clock.sleep`, so tests that use a
:class:`FakeClock` step time explicitly and never really sleep.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from datetime import datetime
from typing import Protocol, runtime_checkable

from tplr.errors import ConfigError


@runtime_checkable
class Clock(Protocol):
    """A source of wall-clock time (unix seconds) that can also sleep."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.time()`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class FakeClock:
    """A clock for tests: time moves only when :meth:`advance` is called.

    ``await sleep(s)`` parks the caller until someone advances the clock past its
    deadline (or, with ``auto_advance=True``, advances the clock itself by ``s`` and
    returns at once, which suits code that sleeps in a loop with nobody stepping time).
    ``advance`` may be called from any thread; sleepers are woken on their own loop.
    """

    def __init__(self, start_s: float = 1_700_000_000.0, *, auto_advance: bool = False) -> None:
        self._now_s = float(start_s)
        self._auto_advance = auto_advance
        self._lock = threading.Lock()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._sleeper_watchers: list[asyncio.Future[None]] = []

    def now(self) -> float:
        with self._lock:
            return self._now_s

    def set(self, now_s: float) -> None:
        """Jump to an absolute time (never backwards)."""
        self.advance(now_s - self.now())

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper now due."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance needs seconds >= 0, got {seconds}")
        with self._lock:
            self._now_s += seconds
            due = []
            while self._sleepers and self._sleepers[0][0] <= self._now_s:
                due.append(heapq.heappop(self._sleepers)[2])
        for future in due:
            _wake(future)

    @property
    def sleeper_count(self) -> int:
        """How many coroutines are parked in :meth:`sleep` right now."""
        with self._lock:
            return self._pending_sleepers()

    def _pending_sleepers(self) -> int:
        return sum(1 for _, _, future in self._sleepers if not future.done())

    async def wait_for_sleepers(self, count: int = 1, *, timeout_s: float = 5.0) -> None:
        """Wait (in real time, briefly) until ``count`` coroutines are sleeping."""
        async with asyncio.timeout(timeout_s):
            while True:
                watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                with self._lock:
                    if self._pending_sleepers() >= count:
                        return
                    self._sleeper_watchers.append(watcher)
                await watcher

    async def sleep(self, seconds: float) -> None:
        if self._auto_advance:
            if seconds > 0:
                self.advance(seconds)
            await asyncio.sleep(0)
            return
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            heapq.heappush(self._sleepers, (self._now_s + seconds, next(self._order), future))
            watchers, self._sleeper_watchers = self._sleeper_watchers, []
        for watcher in watchers:
            _wake(watcher)
        await future


def _wake(future: asyncio.Future[None]) -> None:
    def set_if_pending() -> None:
        if not future.done():
            future.set_result(None)

    loop = future.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        set_if_pending()
    elif not loop.is_closed():
        loop.call_soon_threadsafe(set_if_pending)


class WindowClock:
    """Window arithmetic for one run: ``window = floor((now - genesis) / window_seconds)``.

    Windows are half-open intervals ``[start, end)``: at exactly ``start(w)`` the
    clock reads window ``w``. The upload deadline of window ``w`` is
    ``start(w) + upload_deadline_fraction * window_seconds``.
    """

    def __init__(
        self,
        *,
        genesis_s: float,
        window_seconds: float,
        upload_deadline_fraction: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if not (window_seconds > 0 and math.isfinite(window_seconds)):
            raise ConfigError(
                f"window_seconds must be a positive number, got {window_seconds!r}",
                hint="fix window_seconds in the run's run.json",
            )
        if not 0 < upload_deadline_fraction <= 1:
            raise ConfigError(
                f"upload_deadline_fraction must be in (0, 1], got {upload_deadline_fraction!r}",
                hint="fix upload_deadline_fraction in the run's run.json",
            )
        self.genesis_s = float(genesis_s)
        self.window_seconds = float(window_seconds)
        self.upload_deadline_fraction = float(upload_deadline_fraction)
        self.clock: Clock = clock if clock is not None else SystemClock()

    def window_at(self, timestamp_s: float) -> int:
        """The window containing ``timestamp_s`` (negative before genesis)."""
        window = math.floor((timestamp_s - self.genesis_s) / self.window_seconds)
        # Guard against float rounding at the exact boundaries.
        if self.window_start_s(window + 1) <= timestamp_s:
            window += 1
        elif self.window_start_s(window) > timestamp_s:
            window -= 1
        return window

    def current_window(self) -> int:
        return self.window_at(self.clock.now())

    def window_start_s(self, window: int) -> float:
        return self.genesis_s + window * self.window_seconds

    def window_end_s(self, window: int) -> float:
        """Exclusive end: the start of ``window + 1``."""
        return self.window_start_s(window + 1)

    def upload_deadline_s(self, window: int) -> float:
        return self.window_start_s(window) + self.upload_deadline_fraction * self.window_seconds

    def seconds_until_next_window(self) -> float:
        now_s = self.clock.now()
        return self.window_end_s(self.window_at(now_s)) - now_s

    def seconds_until_upload_deadline(self, window: int) -> float:
        """Negative once the deadline has passed."""
        return self.upload_deadline_s(window) - self.clock.now()

    def uploaded_in_time(self, window: int, uploaded_at: float | datetime) -> bool:
        """True if an upload stamped ``uploaded_at`` lies in ``[start(w), deadline(w)]``."""
        timestamp_s = uploaded_at.timestamp() if isinstance(uploaded_at, datetime) else uploaded_at
        return self.window_start_s(window) <= timestamp_s <= self.upload_deadline_s(window)

    async def wait_for_window(self, window: int) -> None:
        """Return once the clock reads ``window`` or later (at once if it already does)."""
        while True:
            remaining_s = self.window_start_s(window) - self.clock.now()
            if remaining_s <= 0:
                return
            await self.clock.sleep(remaining_s)

    def __repr__(self) -> str:
        return (
            f"WindowClock(genesis_s={self.genesis_s}, window_seconds={self.window_seconds}, "
            f"upload_deadline_fraction={self.upload_deadline_fraction})"
        )
