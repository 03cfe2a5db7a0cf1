"""Time: an injectable clock source and the window clock every node agrees on.

``window = floor((now - genesis) / window_seconds)``, computed from the run's
``run.json``; nothing depends on a local counter, so a restarted node lands in the
right window. Each window is cut into the protocol's phases (:class:`Phases`). All
waiting goes through :meth:`Clock.sleep`, so tests that use a :class:`FakeClock` step
time explicitly and never really sleep.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Phases:
    """Where a window's phases end, as fractions of the window (protocol v2).

    ``[0, commit)`` train and commit; ``[commit, reveal_open)`` validators snapshot the
    commitments; ``[reveal_open, reveal)`` miners reveal their payloads; ``[reveal,
    approval)`` validators check, evaluate and the lead publishes the approved set; from
    ``approval`` on, every node applies the outer step.
    """

    commit: float = 0.60
    reveal_open: float = 0.65
    reveal: float = 0.75
    approval: float = 0.95

    def __post_init__(self) -> None:
        order = (self.commit, self.reveal_open, self.reveal, self.approval)
        if not (0 < order[0] < order[1] < order[2] < order[3] <= 1):
            raise ConfigError(
                "window phases must satisfy 0 < commit < reveal_open < reveal < approval <= 1, "
                f"got commit={self.commit}, reveal_open={self.reveal_open}, "
                f"reveal={self.reveal}, approval={self.approval}",
                hint="fix the *_fraction fields in the run's run.json",
            )


class WindowClock:
    """Window arithmetic for one run: ``window = floor((now - genesis) / window_seconds)``.

    Windows are half-open intervals ``[start, end)``: at exactly ``start(w)`` the clock
    reads window ``w``. The phase boundaries of window ``w`` are ``start(w) + fraction *
    window_seconds`` (:class:`Phases`).
    """

    def __init__(
        self,
        *,
        genesis_s: float,
        window_seconds: float,
        phases: Phases | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not (math.isfinite(genesis_s) and genesis_s >= 0):
            raise ConfigError(
                f"genesis_s must be a finite unix time, got {genesis_s!r}",
                hint="fix genesis_s in the run's run.json",
            )
        if not (math.isfinite(window_seconds) and window_seconds >= 1):
            raise ConfigError(
                f"window_seconds must be a finite number of at least 1, got {window_seconds!r}",
                hint="fix window_seconds in the run's run.json",
            )
        self.genesis_s = float(genesis_s)
        self.window_seconds = float(window_seconds)
        self.phases = phases or Phases()
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

    def _at(self, window: int, fraction: float) -> float:
        return self.window_start_s(window) + fraction * self.window_seconds

    def commit_deadline_s(self, window: int) -> float:
        return self._at(window, self.phases.commit)

    def reveal_open_s(self, window: int) -> float:
        return self._at(window, self.phases.reveal_open)

    def reveal_deadline_s(self, window: int) -> float:
        return self._at(window, self.phases.reveal)

    def approval_deadline_s(self, window: int) -> float:
        return self._at(window, self.phases.approval)

    def phase_boundaries_s(self, window: int) -> tuple[float, ...]:
        """Every boundary of ``window`` in order, ending with the start of the next."""
        return (
            self.commit_deadline_s(window),
            self.reveal_open_s(window),
            self.reveal_deadline_s(window),
            self.approval_deadline_s(window),
            self.window_end_s(window),
        )

    def seconds_until(self, timestamp_s: float) -> float:
        """Negative once ``timestamp_s`` has passed."""
        return timestamp_s - self.clock.now()

    def seconds_until_next_window(self) -> float:
        now_s = self.clock.now()
        return self.window_end_s(self.window_at(now_s)) - now_s

    @staticmethod
    def _stamp(at: float | datetime) -> float:
        return at.timestamp() if isinstance(at, datetime) else float(at)

    def committed_in_time(self, window: int, at: float | datetime) -> bool:
        """A commitment stamped ``at`` lies in ``[start(w), commit deadline(w)]``."""
        return self.window_start_s(window) <= self._stamp(at) <= self.commit_deadline_s(window)

    def revealed_in_time(self, window: int, at: float | datetime) -> bool:
        """A payload stamped ``at`` lies in ``[commit deadline(w), reveal deadline(w)]``:
        not readable before the commitments were closed, and not late."""
        return self.commit_deadline_s(window) <= self._stamp(at) <= self.reveal_deadline_s(window)

    async def sleep_until(self, timestamp_s: float) -> None:
        """Return once the clock reads ``timestamp_s`` or later (at once if it already does)."""
        while True:
            remaining_s = timestamp_s - self.clock.now()
            if remaining_s <= 0:
                return
            await self.clock.sleep(remaining_s)

    async def wait_for_window(self, window: int) -> None:
        """Return once the clock reads ``window`` or later (at once if it already does)."""
        await self.sleep_until(self.window_start_s(window))

    def __repr__(self) -> str:
        return (
            f"WindowClock(genesis_s={self.genesis_s}, window_seconds={self.window_seconds}, "
            f"phases={self.phases})"
        )
