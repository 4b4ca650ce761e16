"""A MessageQueue in memory: for tests of the core and for a third backend to copy.

Nothing is durable: "durable before ack" holds only for as long as the process lives,
so no relay configuration uses it. It decides exactly as the other backends do (dedup,
limits and expired rows by ``relay.core.admission``) and passes the same conformance
suite (``tests/conformance/queue.py``).

Per device: the rows in seq order (a dict keeps insertion order, and seqs only grow),
the accepted (sender, message_id) keys with their expiry, and the depth. Seqs count up
from 1 across devices, never reused.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.clock import Clock, SystemClock
from relay.core.admission import (
    EMPTY,
    Depth,
    Ident,
    Verdict,
    admit,
    ident,
    is_expired,
    live_ids,
    page,
)
from relay.model import (
    Address,
    Appended,
    Envelope,
    EnvelopeKey,
    QueuedEnvelope,
    QueueLimits,
    QueuePage,
)


@dataclass(slots=True)
class _Device:
    seqs: list[int] = field(default_factory=list)  # ascending, of the rows still there
    rows: dict[int, QueuedEnvelope] = field(default_factory=dict)
    by_key: dict[EnvelopeKey, int] = field(default_factory=dict)  # -> seq of its row
    accepted: dict[EnvelopeKey, int] = field(default_factory=dict)  # -> expiry
    depth: Depth = EMPTY

    def remove(self, seq: int) -> QueuedEnvelope:
        row = self.rows.pop(seq)
        del self.seqs[bisect.bisect_left(self.seqs, seq)]
        self.by_key.pop(row.envelope.key, None)
        self.depth = Depth(self.depth.count - 1, self.depth.bytes - row.envelope.size)
        return row


class MemoryQueue:
    """MessageQueue in a dict (see ``relay.core.ports.MessageQueue`` for the contract).

    ``clock`` says when an accepted id has expired (``relay.core.admission.live_ids``).
    Every method runs without awaiting anything, so each is atomic on the event loop.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._devices: dict[Address, _Device] = {}
        self._last_seq = 0

    def _device(self, device: Address) -> _Device:
        found = self._devices.get(device)
        if found is None:
            found = self._devices[device] = _Device()
        return found

    async def append(
        self, envelopes: Sequence[Envelope], expires_at_ms: Sequence[int], limits: QueueLimits
    ) -> list[Appended]:
        """See ``MessageQueue.append``."""
        items = list(zip(envelopes, expires_at_ms, strict=True))
        accepted: dict[Ident, int] = {}
        depths: dict[Address, Depth] = {}
        for env, _ in items:
            d = self._devices.get(env.recipient)
            if d is None:
                continue
            depths[env.recipient] = d.depth
            expires = d.accepted.get(env.key)
            if expires is not None:
                accepted[ident(env)] = expires
        decisions = admit(envelopes, live_ids(accepted, self._clock.now_ms()), depths, limits)
        out: list[Appended] = []
        for (env, expires), decision in zip(items, decisions, strict=True):
            if decision.verdict is not Verdict.ADMITTED:
                out.append(decision.appended())
                continue
            d = self._device(env.recipient)
            old = d.by_key.get(env.key)
            if old is not None:  # an expired copy of a key stored again
                d.remove(old)
            self._last_seq += 1
            seq = self._last_seq
            d.rows[seq] = QueuedEnvelope(seq, env, expires)
            d.seqs.append(seq)
            d.by_key[env.key] = seq
            d.accepted[env.key] = expires
            d.depth = Depth(d.depth.count + 1, d.depth.bytes + env.size)
            out.append(decision.appended(seq))
        return out

    def resume_point(self, cursor: int) -> int:
        """See ``MessageQueue.resume_point``: one writer, seqs only grow, so ``cursor``."""
        return cursor

    async def read(self, device: Address, after: int, limit: int, now_ms: int) -> QueuePage:
        """See ``MessageQueue.read``."""
        d = self._devices.get(device)
        if d is None:
            return page([], after, limit, now_ms)
        start = bisect.bisect_right(d.seqs, after)
        rows = [d.rows[s] for s in d.seqs[start : start + limit + 1]]
        return page(rows, after, limit, now_ms)

    async def ack(self, device: Address, keys: Sequence[EnvelopeKey]) -> int:
        """See ``MessageQueue.ack``."""
        d = self._devices.get(device)
        if d is None:
            return 0
        removed = 0
        for k in dict.fromkeys(keys):
            seq = d.by_key.get(k)
            if seq is not None:
                d.remove(seq)
                removed += 1
        return removed

    async def purge_expired(self, now_ms: int) -> int:
        """See ``MessageQueue.purge_expired``."""
        purged = 0
        for d in self._devices.values():
            for seq in [s for s in d.seqs if is_expired(d.rows[s].expires_at_ms, now_ms)]:
                d.remove(seq)
                purged += 1
            d.accepted = {m: e for m, e in d.accepted.items() if not is_expired(e, now_ms)}
        return purged

    async def purge(self, device: Address) -> int:
        """See ``MessageQueue.purge``."""
        d = self._devices.pop(device, None)
        return 0 if d is None else len(d.rows)

    async def depth(self, device: Address) -> tuple[int, int]:
        """Envelopes and bytes waiting in ``device``'s queue."""
        d = self._devices.get(device)
        return (0, 0) if d is None else (d.depth.count, d.depth.bytes)
