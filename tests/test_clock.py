"""Clocks: the fake one drives timers without sleeping; the real one keeps its API."""

from __future__ import annotations

import asyncio

from relay.clock import Clock, FakeClock, SystemClock


async def test_fake_sleepers_wake_when_time_is_advanced_past_them() -> None:
    clock = FakeClock(1000)
    woke: list[str] = []

    async def timer(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(timer("late", 0.2)), asyncio.create_task(timer("early", 0.05))]
    for _ in range(5):
        await asyncio.sleep(0)  # let both timers start sleeping
    assert clock.sleepers == 2
    clock.advance(49)
    for _ in range(5):
        await asyncio.sleep(0)
    assert woke == []
    clock.advance(1)
    await tasks[1]
    assert woke == ["early"]
    clock.advance(150)
    await tasks[0]
    assert woke == ["early", "late"]
    assert clock.now_ms() == 1200 and clock.monotonic() == 0.2


async def test_fake_sleep_of_zero_returns_and_cancelled_sleepers_are_dropped() -> None:
    clock = FakeClock()
    await clock.sleep(0)
    task = asyncio.create_task(clock.sleep(1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert clock.sleepers == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.sleepers == 0
    clock.advance(2000)  # nothing to wake, no error


async def test_the_system_clock_is_a_clock() -> None:
    clock: Clock = SystemClock()
    before = clock.monotonic()
    await clock.sleep(0)
    assert clock.monotonic() >= before
    assert clock.now_ms() > 1_700_000_000_000
