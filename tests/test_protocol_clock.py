from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest

from tplr.errors import ConfigError
from tplr.protocol.clock import Clock, FakeClock, Phases, SystemClock, WindowClock

GENESIS = 1_700_000_000.0


def make_clock(start_s: float = GENESIS, **kwargs) -> tuple[FakeClock, WindowClock]:
    fake = FakeClock(start_s)
    window_clock = WindowClock(genesis_s=GENESIS, window_seconds=60, clock=fake, **kwargs)
    return fake, window_clock


def test_window_boundaries_are_half_open():
    fake, windows = make_clock()
    assert windows.current_window() == 0
    fake.advance(59.999)
    assert windows.current_window() == 0
    fake.advance(0.001)
    assert windows.current_window() == 1
    assert windows.window_at(GENESIS - 0.5) == -1
    assert windows.window_at(GENESIS + 60 * 1000) == 1000
    assert windows.window_start_s(3) == GENESIS + 180
    assert windows.window_end_s(3) == windows.window_start_s(4)


def test_window_at_exact_boundaries_with_awkward_float_lengths():
    windows = WindowClock(genesis_s=1_712_345_678.9, window_seconds=1.1, clock=FakeClock())
    for window in range(0, 5000, 7):
        start = windows.window_start_s(window)
        assert windows.window_at(start) == window
        assert windows.window_at(windows.window_end_s(window)) == window + 1


def test_phase_boundaries_and_timing_checks():
    fake, windows = make_clock(
        phases=Phases(commit=0.5, reveal_open=0.6, reveal=0.75, approval=0.9)
    )
    fake.advance(60 * 5 + 10)
    assert windows.current_window() == 5
    start = GENESIS + 300
    assert windows.phase_boundaries_s(5) == (
        start + 30,
        start + 36,
        start + 45,
        start + 54,
        start + 60,
    )
    assert windows.seconds_until(windows.commit_deadline_s(5)) == pytest.approx(20)
    assert windows.seconds_until_next_window() == pytest.approx(50)
    assert windows.committed_in_time(5, start)
    assert windows.committed_in_time(5, start + 30)
    assert not windows.committed_in_time(5, start + 30.001)
    assert not windows.committed_in_time(5, start - 0.001)
    assert windows.committed_in_time(5, datetime.fromtimestamp(start + 20, tz=UTC))
    assert not windows.revealed_in_time(5, start + 29)  # readable before the commit deadline
    assert windows.revealed_in_time(5, start + 40)
    assert not windows.revealed_in_time(5, start + 45.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_seconds": 0}, "window_seconds"),
        ({"window_seconds": 1e-300}, "window_seconds"),
        ({"window_seconds": float("nan")}, "window_seconds"),
        ({"window_seconds": 60, "genesis_s": float("inf")}, "genesis_s"),
    ],
)
def test_bad_window_settings_are_refused(kwargs, message):
    """Issue 10, item 7: ``window_seconds: 1e-300`` or ``genesis_s: Infinity`` were accepted."""
    with pytest.raises(ConfigError, match=message) as info:
        WindowClock(**{"genesis_s": GENESIS, **kwargs})
    assert "run.json" in info.value.hint


@pytest.mark.parametrize(
    "fractions",
    [(0.6, 0.6, 0.7, 0.9), (0.8, 0.7, 0.9, 0.95), (0.6, 0.65, 0.75, 1.01), (0, 0.1, 0.2, 0.3)],
)
def test_phases_must_be_ordered(fractions):
    with pytest.raises(ConfigError, match="commit < reveal_open < reveal < approval"):
        Phases(*fractions)


async def test_wait_for_window_sleeps_on_the_fake_clock_until_stepped():
    fake, windows = make_clock()
    waiter = asyncio.create_task(windows.wait_for_window(2))
    await fake.wait_for_sleepers(1)
    fake.advance(60)  # window 1: not yet
    await asyncio.sleep(0)
    await fake.wait_for_sleepers(1)
    assert not waiter.done()
    fake.advance(59)
    await fake.wait_for_sleepers(1)
    assert not waiter.done()
    fake.advance(1)  # exactly the start of window 2
    await asyncio.wait_for(waiter, timeout=1)
    assert windows.current_window() == 2


async def test_wait_for_past_window_returns_at_once():
    fake, windows = make_clock(GENESIS + 600)
    await asyncio.wait_for(windows.wait_for_window(3), timeout=1)
    assert fake.sleeper_count == 0


async def test_fake_clock_wakes_sleepers_in_deadline_order_and_survives_cancel():
    fake = FakeClock(0.0)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await fake.sleep(seconds)
        woke.append(name)

    async with asyncio.TaskGroup() as group:
        group.create_task(sleeper("late", 10))
        group.create_task(sleeper("early", 5))
        cancelled = group.create_task(sleeper("cancelled", 7))
        await fake.wait_for_sleepers(3)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert fake.sleeper_count == 2
        fake.advance(6)
        await asyncio.sleep(0)
        assert woke == ["early"]
        fake.advance(100)
    assert woke == ["early", "late"]
    with pytest.raises(ValueError, match="seconds >= 0"):
        fake.advance(-1)


async def test_fake_clock_advance_from_another_thread_wakes_the_loop():
    fake = FakeClock(0.0)
    sleeping = asyncio.create_task(fake.sleep(30))
    await fake.wait_for_sleepers(1)
    thread = threading.Thread(target=fake.advance, args=(30,))
    thread.start()
    await asyncio.wait_for(sleeping, timeout=2)
    thread.join()
    assert fake.now() == 30


async def test_auto_advance_clock_moves_time_without_real_sleep():
    fake = FakeClock(100.0, auto_advance=True)
    windows = WindowClock(genesis_s=100.0, window_seconds=3600, clock=fake)
    await asyncio.wait_for(windows.wait_for_window(24), timeout=1)
    assert fake.now() == 100.0 + 24 * 3600
    assert windows.current_window() == 24


async def test_system_clock_is_a_clock():
    clock = SystemClock()
    assert isinstance(clock, Clock) and isinstance(FakeClock(), Clock)
    before = clock.now()
    await clock.sleep(0.01)
    assert clock.now() >= before + 0.005
