"""Fixed-window rate limits, in memory, per key directory process.

Each limit counts hits per key (a requester, or a (requester, device) pair) in windows
of a fixed length. Keys are callers that already proved who they are (a verified
signature, a known API key), so the number of keys is bounded by the registered
devices and configured keys; past ``max_keys`` live windows the oldest are dropped
first, and if they are all still live new keys are refused (so memory stays bounded
and nobody is let through unchecked).

Limits here are per process: with N key directory processes a caller may get up to N
times a limit. Replay protection, which must hold across processes, is not done here
but in the shared store (``keyserver.ports.OnceOnly``).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.errors import LimitExceeded

#: Live windows kept per limiter at most.
DEFAULT_MAX_KEYS = 200_000


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` hits per ``window_ms``; ``name`` is the limit's config name."""

    name: str
    count: int
    window_ms: int

    def describe(self) -> str:
        """``120 per 60 s`` (for error messages)."""
        return f"{self.count} per {self.window_ms // 1000} s"


class RateLimiter:
    """Counts hits against one :class:`Rate` per key."""

    def __init__(self, rate: Rate, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate = rate
        self._max_keys = max_keys
        self._windows: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, now_ms: int, *, cost: int = 1, what: str = "requests") -> None:
        """Count ``cost`` hits of ``key`` now; raise LimitExceeded naming the limit if over.

        A refused hit is not counted, so a caller that waits for the window to pass gets
        through again.
        """
        start, used = self.check(key, now_ms, cost=cost, what=what)
        window = self._windows.get(key)
        if window is None and len(self._windows) >= self._max_keys:
            self._prune(start)
            if len(self._windows) >= self._max_keys:
                raise LimitExceeded(
                    self.rate.name,
                    self.rate.count,
                    f"{what}: too many callers at once for {self.rate.name}; retry in a minute",
                )
        self._windows[key] = (start, used + cost)

    def check(
        self, key: str, now_ms: int, *, cost: int = 1, what: str = "requests"
    ) -> tuple[int, int]:
        """Raise LimitExceeded if ``cost`` more hits of ``key`` would pass the limit.

        Counts nothing; returns the current window's start and the hits in it.
        """
        rate = self.rate
        start = now_ms - now_ms % rate.window_ms if rate.window_ms else 0
        window = self._windows.get(key)
        used = window[1] if window is not None and window[0] == start else 0
        if used + cost > rate.count:
            retry_s = max(1, (start + rate.window_ms - now_ms + 999) // 1000)
            raise LimitExceeded(
                rate.name,
                rate.count,
                f"{what}: {rate.name} = {rate.describe()} reached for {key}; retry in {retry_s} s",
            )
        return start, used

    def _prune(self, current_start: int) -> None:
        for key in [k for k, (start, _) in self._windows.items() if start < current_start]:
            del self._windows[key]
