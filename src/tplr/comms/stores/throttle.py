"""Per-bucket request-rate throttle that backs off when the server says ``SlowDown``.

Built on ``asyncio-throttle``. With no configured rate it is a no-op until the first
429/SlowDown; then it imposes a rate that starts at half the observed request rate and
halves again on each further throttle signal, and recovers 10% per quiet interval (back
to the configured rate, or to unthrottled). A burst of throttle answers to requests that
were in flight together counts as one signal: only one halving per cooldown.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from asyncio_throttle import Throttler

_MIN_RATE = 1.0
_RECOVER_AFTER_S = 5.0
_SLOW_DOWN_COOLDOWN_S = 1.0
_UNTHROTTLED_ABOVE = 10_000.0


class AdaptiveThrottle:
    """``async with throttle:`` around each request."""

    def __init__(
        self,
        requests_per_second: float | None = None,
        *,
        recover_after_s: float = _RECOVER_AFTER_S,
        slow_down_cooldown_s: float = _SLOW_DOWN_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured_rate = requests_per_second
        self.rate = requests_per_second
        self._recover_after_s = recover_after_s
        self._cooldown_s = slow_down_cooldown_s
        self._clock = clock
        self._throttler = Throttler(rate_limit=requests_per_second) if requests_per_second else None
        self._recent: deque[float] = deque(maxlen=1024)
        self._last_slow_down: float | None = None

    def _set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self._throttler = Throttler(rate_limit=max(rate, _MIN_RATE)) if rate else None

    def observed_rate(self) -> float:
        """Requests started in the last second."""
        now = self._clock()
        return float(sum(1 for t in self._recent if now - t <= 1.0))

    def slow_down(self) -> None:
        """The server throttled us: cut the allowed request rate in half (once per cooldown;
        the answers to requests that were already in flight are the same signal)."""
        now = self._clock()
        if self._last_slow_down is not None and now - self._last_slow_down < self._cooldown_s:
            self._last_slow_down = now
            return
        base = self.rate if self.rate else max(self.observed_rate(), 2 * _MIN_RATE)
        self._set_rate(max(base / 2, _MIN_RATE))
        self._last_slow_down = now

    def _maybe_recover(self, now: float) -> None:
        if self.rate is None or self._last_slow_down is None:
            return
        if now - self._last_slow_down < self._recover_after_s:
            return
        if self.configured_rate is not None and self.rate >= self.configured_rate:
            return
        new_rate: float | None = self.rate * 1.1
        if self.configured_rate is not None:
            new_rate = min(self.rate * 1.1, self.configured_rate)
        elif self.rate * 1.1 > _UNTHROTTLED_ABOVE:
            new_rate = None  # fully recovered: unthrottled again
        self._set_rate(new_rate)
        self._last_slow_down = now

    async def __aenter__(self) -> AdaptiveThrottle:
        self._maybe_recover(self._clock())
        if self._throttler is not None:
            await self._throttler.acquire()
        self._recent.append(self._clock())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None
