"""The one retry policy: exponential backoff with full jitter, bounded attempts and time.

Stores make single attempts and raise typed errors; callers wrap an attempt in
:func:`retry`. Only errors whose class says ``retryable`` are retried; everything else
(``NotFound``, ``AccessDenied``, ``InvalidRequest``, ``IntegrityError`` of a whole
object) propagates at once. ``CancelledError`` is never caught.

The attempt callable acquires any concurrency slot itself, so the backoff sleep here
happens outside the slot: a part waiting to retry never holds a worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tplr.comms.errors import StoreError, Throttled

T = TypeVar("T")
log = logging.getLogger(__name__)

RetryHook = Callable[[StoreError, int, float], None]
"""Called before each backoff sleep with (error, attempt number, sleep seconds)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    base_delay_s: float = 0.2
    max_delay_s: float = 30.0
    total_timeout_s: float | None = 900.0

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**(attempt-1))]."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** max(attempt - 1, 0)))
        return (rng or random).uniform(0.0, cap)


def reason_of(error: BaseException) -> str:
    """A short, low-cardinality label for metrics: ``throttled``, ``transient``, …"""
    from tplr.comms import errors

    for cls, label in (
        (errors.Throttled, "throttled"),
        (errors.PreconditionFailed, "changed"),
        (errors.IntegrityError, "integrity"),
        (errors.InsufficientSpace, "disk_space"),
        (errors.NotFound, "not_found"),
        (errors.AccessDenied, "access_denied"),
        (errors.TransientError, "transient"),
    ):
        if isinstance(error, cls):
            return label
    return "other"


async def retry(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    describe: str,
    on_retry: RetryHook | None = None,
    retry_on: tuple[type[StoreError], ...] = (),
) -> T:
    """Run ``attempt`` until it succeeds, a non-retryable error occurs, or the budget ends.

    ``retry_on`` adds error classes to retry beyond those marked ``retryable`` (the
    download engine retries a part whose hash mismatched, for example).
    """
    deadline = None if policy.total_timeout_s is None else time.monotonic() + policy.total_timeout_s
    number = 0
    while True:
        number += 1
        try:
            return await attempt()
        except StoreError as exc:
            if not (exc.retryable or isinstance(exc, retry_on)):
                raise
            if number >= policy.max_attempts:
                log.warning("%s: giving up after %d attempts: %s", describe, number, exc)
                raise
            delay = policy.backoff_s(number)
            if isinstance(exc, Throttled):
                delay = max(delay, policy.base_delay_s * 2)
            if deadline is not None and time.monotonic() + delay > deadline:
                log.warning("%s: retry time budget spent after %d attempts", describe, number)
                raise
            if on_retry is not None:
                on_retry(exc, number, delay)
            log.debug("%s: attempt %d failed (%s); retrying in %.2fs", describe, number, exc, delay)
            await asyncio.sleep(delay)
