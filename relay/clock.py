"""Clocks are injected so that tests never sleep.

A ``Clock`` tells wall-clock time (``now_ms``: seqs, expiries, anything stored or
compared across processes) and monotonic time (``monotonic``: timeouts and intervals
within this process, never stepped by NTP), and sleeps (``sleep``: timers). A timer
written as ``deadline = clock.monotonic() + t`` then ``await clock.sleep(...)`` runs
against ``SystemClock`` in production and against ``FakeClock`` in tests, where time
moves only when the test says so (``advance``) and sleepers wake exactly then.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock and monotonic time, and sleeping."""

    def now_ms(self) -> int:
        """Return the current time in milliseconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock's monotonic time."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        """Return ``time.time()`` in whole milliseconds."""
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep(seconds)``."""
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told to (tests).

    Wall-clock and monotonic time move together, by ``advance``. ``sleep`` waits until
    ``advance`` has moved monotonic time past its deadline; a sleep of zero or less
    returns at once (after yielding to the loop, like ``asyncio.sleep(0)``).
    """

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._mono_ms = 0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now_ms(self) -> int:
        """Return the fake time."""
        return self._now

    def monotonic(self) -> float:
        """Seconds since the clock was made (moved by ``advance`` only)."""
        return self._mono_ms / 1000

    async def sleep(self, seconds: float) -> None:
        """Wait until ``advance`` reaches ``monotonic() + seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.monotonic() + seconds, next(self._order), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many ``sleep`` calls are waiting (so a test can wait for a timer to start)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms`` milliseconds and wake the sleepers now due."""
        self._now += ms
        self._mono_ms += ms
        now = self.monotonic()
        while self._sleepers and self._sleepers[0][0] <= now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():  # a cancelled sleeper is just dropped
                fut.set_result(None)
