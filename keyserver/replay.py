"""A bounded memory of recently seen signed requests, so none is accepted twice."""

from __future__ import annotations

import heapq

from relay.errors import Unauthenticated, Unavailable


class ReplayCache:
    """Remembers request digests until their acceptance window has passed.

    A signed request is accepted only within a window around its own time, so a digest
    needs keeping only until then. The cache holds at most ``max_entries``: when that
    many unexpired requests are remembered, new ones are refused (retryable) rather than
    forgetting one early, which would reopen the door to replays.
    """

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._expiries: list[tuple[int, bytes]] = []
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, digest: bytes, expires_at_ms: int, now_ms: int) -> None:
        """Record ``digest`` until ``expires_at_ms``; raise Unauthenticated if seen already."""
        while self._expiries and self._expiries[0][0] < now_ms:
            _, old = heapq.heappop(self._expiries)
            self._seen.discard(old)
        if digest in self._seen:
            raise Unauthenticated("replayed request: this signed request was accepted before")
        if len(self._seen) >= self._max:
            raise Unavailable("too many signed requests in the last minute; retry later")
        self._seen.add(digest)
        heapq.heappush(self._expiries, (expires_at_ms, digest))
