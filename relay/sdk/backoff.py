"""Reconnect pacing: exponential backoff with full jitter, injectable for tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

DEFAULT_BASE_SECONDS = 0.2
DEFAULT_CAP_SECONDS = 30.0


class Backoff(Protocol):
    """Called before reconnect attempt number ``attempt`` (1 = first after a failure).

    ``attempt`` counts consecutive failures and restarts at 1 once a session reached
    Ready. Return True to reconnect (after waiting as long as wanted), False to give up:
    the client then fails with the last connection error.
    """

    async def __call__(self, attempt: int) -> bool:
        """Wait before reconnecting; False gives up."""
        ...


class ExponentialBackoff:
    """Wait a random time in ``[0, min(cap, base * 2**(attempt-1))]`` ("full jitter").

    ``max_attempts`` (None: forever) bounds consecutive failed attempts. ``sleep`` and
    ``rand`` are injectable so that tests never sleep for real.
    """

    def __init__(
        self,
        *,
        base: float = DEFAULT_BASE_SECONDS,
        cap: float = DEFAULT_CAP_SECONDS,
        max_attempts: int | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base = base
        self.cap = cap
        self.max_attempts = max_attempts
        self._sleep = sleep
        self._rand = rand

    def delay(self, attempt: int) -> float:
        """Seconds to wait before ``attempt``."""
        return self._rand() * min(self.cap, self.base * 2.0 ** min(attempt - 1, 62))

    async def __call__(self, attempt: int) -> bool:
        """Sleep :meth:`delay` seconds, or return False past ``max_attempts``."""
        if self.max_attempts is not None and attempt > self.max_attempts:
            return False
        await self._sleep(self.delay(attempt))
        return True
