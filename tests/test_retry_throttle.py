"""The one retry policy (full jitter, classification, bounds) and the adaptive throttle."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tplr.comms.errors import (
    AccessDenied,
    IntegrityError,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    Throttled,
    TransientError,
)
from tplr.comms.retry import RetryPolicy, reason_of, retry
from tplr.comms.stores.throttle import AdaptiveThrottle

FAST = RetryPolicy(max_attempts=5, base_delay_s=0.001, max_delay_s=0.004, total_timeout_s=5)


class Flaky:
    """An attempt that raises the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_full_jitter_stays_within_the_exponential_cap():
    policy = RetryPolicy(base_delay_s=0.2, max_delay_s=30.0)
    rng = random.Random(1234)
    for attempt in range(1, 15):
        cap = min(30.0, 0.2 * 2 ** (attempt - 1))
        samples = [policy.backoff_s(attempt, rng) for _ in range(2000)]
        assert all(0.0 <= s <= cap for s in samples)
        # full jitter spreads over the whole [0, cap], not just near the cap
        assert min(samples) < 0.05 * cap and max(samples) > 0.95 * cap


async def test_retryable_errors_are_retried_until_success():
    attempt = Flaky(TransientError("reset"), Throttled("slow down"), PreconditionFailed("changed"))
    seen: list[tuple[str, int]] = []
    result = await retry(
        attempt, FAST, describe="x", on_retry=lambda e, n, d: seen.append((reason_of(e), n))
    )
    assert result == "ok" and attempt.calls == 4
    assert seen == [("transient", 1), ("throttled", 2), ("changed", 3)]


@pytest.mark.parametrize(
    "error", [NotFound("nope"), AccessDenied("no"), InvalidRequest("bad"), IntegrityError("bad")]
)
async def test_non_retryable_errors_raise_at_once(error):
    attempt = Flaky(error)
    with pytest.raises(type(error)):
        await retry(attempt, FAST, describe="x")
    assert attempt.calls == 1


async def test_retry_on_adds_classes():
    attempt = Flaky(IntegrityError("bad part"))
    assert await retry(attempt, FAST, describe="x", retry_on=(IntegrityError,)) == "ok"
    assert attempt.calls == 2


async def test_other_exceptions_are_not_retried():
    attempt = Flaky(ValueError("a bug, not a network problem"))
    with pytest.raises(ValueError):
        await retry(attempt, FAST, describe="x")
    assert attempt.calls == 1


async def test_attempts_are_bounded():
    attempt = Flaky(*[TransientError(f"fail {i}") for i in range(50)])
    with pytest.raises(TransientError, match="fail 4"):
        await retry(attempt, FAST, describe="x")
    assert attempt.calls == FAST.max_attempts


async def test_total_time_is_bounded():
    policy = RetryPolicy(max_attempts=1000, base_delay_s=0.05, max_delay_s=0.1, total_timeout_s=0.4)
    attempt = Flaky(*[TransientError("down") for _ in range(1000)])
    started = time.monotonic()
    with pytest.raises(TransientError):
        await retry(attempt, policy, describe="x")
    assert time.monotonic() - started <= 0.4 + 0.1
    assert 2 <= attempt.calls < 1000


async def test_throttled_waits_at_least_twice_the_base_delay():
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=0.05)
    delays: list[float] = []
    await retry(
        Flaky(Throttled("slow")), policy, describe="x", on_retry=lambda e, n, d: delays.append(d)
    )
    assert delays and delays[0] >= 0.1


async def test_cancellation_during_backoff_is_never_swallowed():
    policy = RetryPolicy(max_attempts=5, base_delay_s=10.0, max_delay_s=10.0)
    attempt = Flaky(TransientError("down"), TransientError("down"))
    task = asyncio.create_task(retry(attempt, policy, describe="x", on_retry=lambda *a: None))
    while attempt.calls == 0:
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempt.calls == 1


# -- throttle -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_unconfigured_throttle_is_a_no_op():
    throttle = AdaptiveThrottle()
    started = time.monotonic()
    for _ in range(500):
        async with throttle:
            pass
    assert throttle.rate is None and time.monotonic() - started < 0.5


async def test_configured_rate_is_enforced():
    throttle = AdaptiveThrottle(requests_per_second=40)
    started = time.monotonic()
    for _ in range(50):  # 40 in the first second, the other 10 after it
        async with throttle:
            pass
    assert time.monotonic() - started >= 0.95


async def test_slow_down_halves_once_per_burst_and_recovers():
    clock = FakeClock()
    throttle = AdaptiveThrottle(recover_after_s=5.0, slow_down_cooldown_s=1.0, clock=clock)
    for _ in range(40):  # 40 requests within the last second
        async with throttle:
            pass
    throttle.slow_down()
    assert throttle.rate == 20.0  # half the observed rate
    for _ in range(15):  # the other in-flight requests' SlowDowns: one signal, not 16
        throttle.slow_down()
    assert throttle.rate == 20.0
    clock.now += 1.5
    throttle.slow_down()  # still throttled after the cooldown: halve again
    assert throttle.rate == 10.0
    clock.now += 4.0
    async with throttle:  # not quiet for long enough yet
        pass
    assert throttle.rate == 10.0
    clock.now += 1.1
    async with throttle:
        pass
    assert throttle.rate == pytest.approx(11.0)
    for _ in range(100):  # recovers step by step until unthrottled again
        clock.now += 5.1
        async with throttle:
            pass
    assert throttle.rate is None


async def test_recovery_stops_at_the_configured_rate():
    clock = FakeClock()
    throttle = AdaptiveThrottle(requests_per_second=80, clock=clock)
    throttle.slow_down()
    assert throttle.rate == 40.0
    throttle_floor = AdaptiveThrottle(requests_per_second=1.5, clock=clock)
    throttle_floor.slow_down()
    assert throttle_floor.rate == 1.0  # never below one request per second
    for _ in range(20):
        clock.now += 5.1
        async with throttle:
            pass
    assert throttle.rate == 80.0
