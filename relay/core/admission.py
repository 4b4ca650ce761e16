"""What a queue append and read decide, as pure functions of facts a store fetched.

Every ``MessageQueue`` backend (SQLite, Cassandra, in memory) does the same three
things around its own I/O: it fetches facts (which ids its recipients accepted before
and until when, how deep and how big each recipient's queue is, the rows of a page),
asks this module what to do, and writes rows. Keeping the decisions here means a new
backend cannot drift from the others on what counts as a duplicate, which limit a
rejection names, or which rows a read skips:

- ``live_ids``: an accepted id counts for dedup until its expiry (exclusive); past it,
  the id may be stored again.
- ``admit``: per envelope, in call order: DUPLICATE if its (recipient, sender,
  message_id) (``ident``) is a live id or was admitted earlier in the same call; else
  REJECTED naming ``max_queue_depth`` (one more envelope would pass
  ``limits.max_depth``) or ``max_queue_bytes`` (its size would pass
  ``limits.max_bytes``), depth checked first; else ADMITTED, and it counts
  against the limits of the envelopes after it. A rejected or duplicate envelope takes
  no room. The sender is part of the key because senders choose message ids: keyed by
  (recipient, message_id) alone, a device that learned the id another sender would use
  could send first with it and that sender's envelope would be dropped as a duplicate.
- ``page``: a read page of rows fetched ``limit + 1`` at a time: expired rows are
  skipped but still move the cursor, so a reader never fetches them again.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from relay.model import (
    Address,
    Appended,
    Envelope,
    Outcome,
    QueuedEnvelope,
    QueueLimits,
    QueuePage,
)

K = TypeVar("K", bound=Hashable)
#: A recipient's identity of one message: (recipient device, sender, message_id).
Ident = tuple[Address, Address, bytes]


class Limit(enum.Enum):
    """A queue limit that can refuse an envelope; the value is the name clients see."""

    DEPTH = "max_queue_depth"
    BYTES = "max_queue_bytes"


class Verdict(enum.Enum):
    """What to do with one envelope of an append."""

    ADMITTED = 1
    DUPLICATE = 2
    REJECTED = 3


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one envelope: ``limit`` is set exactly when REJECTED."""

    verdict: Verdict
    limit: Limit | None = None

    def appended(self, seq: int = 0) -> Appended:
        """The store's answer for this decision (``seq``: where an admitted one went)."""
        if self.verdict is Verdict.ADMITTED:
            return Appended(Outcome.STORED, seq=seq)
        if self.verdict is Verdict.DUPLICATE:
            return Appended(Outcome.DUPLICATE)
        assert self.limit is not None
        return Appended(Outcome.REJECTED, limit=self.limit.value)


ADMITTED = Admission(Verdict.ADMITTED)
DUPLICATE = Admission(Verdict.DUPLICATE)


@dataclass(frozen=True, slots=True)
class Depth:
    """How many envelopes, and how many bytes (``Envelope.size``), a queue holds."""

    count: int = 0
    bytes: int = 0


EMPTY = Depth()


def ident(envelope: Envelope) -> Ident:
    """The dedup identity of ``envelope``: (recipient, sender, message_id)."""
    return (envelope.recipient, envelope.sender, envelope.message_id)


def is_expired(expires_at_ms: int, now_ms: int) -> bool:
    """Whether something expiring at ``expires_at_ms`` is gone at ``now_ms`` (inclusive)."""
    return expires_at_ms <= now_ms


def live_ids(accepted: Mapping[K, int], now_ms: int) -> set[K]:
    """The ids of ``accepted`` (id -> its expiry) that still count as accepted at ``now_ms``."""
    return {ident for ident, expires in accepted.items() if not is_expired(expires, now_ms)}


def admit(
    envelopes: Sequence[Envelope],
    accepted: Collection[Ident],
    depths: Mapping[Address, Depth],
    limits: QueueLimits,
) -> list[Admission]:
    """Decide each envelope of one append, in order (module docstring).

    ``accepted`` holds the live (recipient, sender, message_id) idents among the envelopes
    (others may be there too); ``depths`` each recipient's queue now (missing: empty).
    """
    seen: set[Ident] = set()
    depth: dict[Address, Depth] = {}
    out: list[Admission] = []
    for env in envelopes:
        key = ident(env)
        if key in seen or key in accepted:
            out.append(DUPLICATE)
            continue
        now = depth.get(env.recipient) or depths.get(env.recipient, EMPTY)
        if now.count + 1 > limits.max_depth:
            out.append(Admission(Verdict.REJECTED, Limit.DEPTH))
            continue
        if now.bytes + env.size > limits.max_bytes:
            out.append(Admission(Verdict.REJECTED, Limit.BYTES))
            continue
        seen.add(key)
        depth[env.recipient] = Depth(now.count + 1, now.bytes + env.size)
        out.append(ADMITTED)
    return out


def added_depth(envelopes: Iterable[Envelope]) -> dict[Address, Depth]:
    """What ``envelopes`` add to their recipients' queues (for the depth counters)."""
    out: dict[Address, Depth] = {}
    for env in envelopes:
        now = out.get(env.recipient, EMPTY)
        out[env.recipient] = Depth(now.count + 1, now.bytes + env.size)
    return out


def page(rows: Sequence[QueuedEnvelope], after: int, limit: int, now_ms: int) -> QueuePage:
    """The page for ``rows``: the first ``limit + 1`` rows with seq > ``after``, in seq order.

    Returns at most ``limit`` unexpired items; ``cursor`` is the seq of the last row
    looked at (expired ones included), or ``after`` if none; ``more`` says that a row
    beyond ``limit`` was fetched.
    """
    cursor = after
    items: list[QueuedEnvelope] = []
    for row in rows[:limit]:
        cursor = row.seq
        if not is_expired(row.expires_at_ms, now_ms):
            items.append(row)
    return QueuePage(tuple(items), cursor, len(rows) > limit)
