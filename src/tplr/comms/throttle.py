"""Per-bucket request-rate throttle that backs off when the server says ``SlowDown``.

Built on ``asyncio-throttle``. With no configured rate it is a no-op until the first
429/SlowDown; then it imposes a rate that starts at the observed request rate and
halves on each further throttle signal, and recovers 10% per quiet interval.
"""

from __future__ import annotations

import time
from collections import deque

from asyncio_throttle import Throttler

_MIN_RATE = 1.0
_RECOVER_AFTER_S = 5.0


class AdaptiveThrottle:
    """``async with throttle:`` around each request."""

    def __init__(self, requests_per_second: float | None = None) -> None:
        self.configured_rate = requests_per_second
        self.rate = requests_per_second
        self._throttler = Throttler(rate_limit=requests_per_second) if requests_per_second else None
        self._recent: deque[float] = deque(maxlen=256)
        self._last_slow_down = 0.0

    def _set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self._throttler = Throttler(rate_limit=max(rate, _MIN_RATE)) if rate else None

    def observed_rate(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._recent if now - t <= 1.0]
        return float(len(recent))

    def slow_down(self) -> None:
        """The server throttled us: cut the allowed request rate in half."""
        now = time.monotonic()
        base = self.rate if self.rate else max(self.observed_rate(), 2 * _MIN_RATE)
        self._set_rate(max(base / 2, _MIN_RATE))
        self._last_slow_down = now

    def _maybe_recover(self, now: float) -> None:
        if self.rate is None or now - self._last_slow_down < _RECOVER_AFTER_S:
            return
        if self.configured_rate is not None and self.rate >= self.configured_rate:
            return
        new_rate = self.rate * 1.1
        if self.configured_rate is not None:
            new_rate = min(new_rate, self.configured_rate)
        elif new_rate > 10_000:
            new_rate = None  # fully recovered: unthrottled again
        self._set_rate(new_rate)
        self._last_slow_down = now

    async def __aenter__(self) -> AdaptiveThrottle:
        now = time.monotonic()
        self._maybe_recover(now)
        if self._throttler is not None:
            await self._throttler.acquire()
        self._recent.append(now)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None
