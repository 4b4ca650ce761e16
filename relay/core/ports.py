"""The storage and lookup protocols the relay core depends on, one per concern."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relay.model import Address, Appended, Envelope, QueueLimits, QueuePage


class MessageQueue(Protocol):
    """Durable per-device queues of envelopes (store-and-forward)."""

    async def append(
        self, envelopes: Sequence[Envelope], expires_at_ms: Sequence[int], limits: QueueLimits
    ) -> list[Appended]:
        """Durably store each envelope in its recipient's queue; one answer per envelope.

        Idempotent by (recipient, message_id): an id accepted before (even if since acked,
        until it expires) answers DUPLICATE and stores nothing. A recipient whose queue
        would pass ``limits`` answers REJECTED naming the limit. Returns only once the
        STORED envelopes are durable. Within one call and across calls, envelopes to one
        recipient are queued in call order.
        """
        ...

    async def read(self, device: Address, after: int, limit: int, now_ms: int) -> QueuePage:
        """Return up to ``limit`` unacked, unexpired envelopes of ``device`` with seq > ``after``.

        Items are in ascending seq (queue order). ``page.cursor`` resumes the read.
        """
        ...

    async def ack(self, device: Address, message_ids: Sequence[bytes]) -> int:
        """Remove the named envelopes from ``device``'s queue; return how many were there.

        Unknown ids are ignored (acks are idempotent). An acked id is never delivered again.
        """
        ...

    async def purge_expired(self, now_ms: int) -> int:
        """Delete expired envelopes and dedup records; return how many envelopes went."""
        ...


class IdentityKeys(Protocol):
    """The relay's view of the key directory."""

    async def identity_key(self, device: Address) -> bytes | None:
        """Return the Ed25519 identity key of ``device``, or None if it is not registered."""
        ...
