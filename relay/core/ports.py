"""The storage and lookup protocols the relay core depends on, one per concern."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from relay.errors import ClientError
from relay.model import (
    Address,
    Appended,
    Envelope,
    EnvelopeKey,
    Location,
    Notice,
    Offered,
    Outcome,
    Pushed,
    QueueLimits,
    QueuePage,
)


class MessageQueue(Protocol):
    """Durable per-device queues of envelopes (store-and-forward)."""

    async def append(
        self, envelopes: Sequence[Envelope], expires_at_ms: Sequence[int], limits: QueueLimits
    ) -> list[Appended]:
        """Durably store each envelope in its recipient's queue; one answer per envelope.

        Idempotent by (recipient, sender, message_id) (``Envelope.key`` per recipient; the
        envelope's ``sender`` is the authenticated one, set by the core): a key accepted
        before (even if since acked, until it expires) answers DUPLICATE and stores
        nothing. The same id from another sender is another envelope (both are stored),
        so no device can pre-claim an id that another sender will use. A recipient whose queue
        would pass ``limits`` answers REJECTED naming the limit. Returns only once the
        STORED envelopes are durable. Within one call and across calls, envelopes to one
        recipient are queued in call order.
        """
        ...

    def resume_point(self, cursor: int) -> int:
        """Where a reader that has read a device's queue up to ``cursor`` reads on from.

        Every envelope appended after that read completed has a seq above the returned
        value (which may be below ``cursor``: the reader then skips what it delivered).
        A backend whose seqs are made by several writers' clocks steps back by their
        allowed lag; one with a single writer returns ``cursor``.
        """
        ...

    async def read(self, device: Address, after: int, limit: int, now_ms: int) -> QueuePage:
        """Return up to ``limit`` unacked, unexpired envelopes of ``device`` with seq > ``after``.

        Items are in ascending seq (queue order). ``page.cursor`` resumes the read.
        """
        ...

    async def ack(self, device: Address, keys: Sequence[EnvelopeKey]) -> int:
        """Remove the envelopes named by (sender, message_id) from ``device``'s queue.

        Returns how many were there. Only those keys go: an envelope with the same id
        from another sender stays. Unknown keys are ignored (acks are idempotent). An
        acked envelope is never delivered again, and its key stays a duplicate until it
        expires.
        """
        ...

    async def purge_expired(self, now_ms: int) -> int:
        """Delete expired envelopes and dedup records; return how many envelopes went."""
        ...

    async def purge(self, device: Address) -> int:
        """Delete ``device``'s whole queue and its dedup records; return how many envelopes went.

        For a device removed for good (its address is never registered again). Idempotent:
        a second purge finds nothing and returns 0; several nodes may purge one device at
        once (each may then count the same envelopes). Other devices are untouched.
        """
        ...


class IdentityKeys(Protocol):
    """The relay's view of the key directory."""

    async def identity_key(self, device: Address) -> bytes | None:
        """Return the Ed25519 identity key of ``device``, or None if it is not registered."""
        ...

    async def devices(self, tenant: str, user: str, *, fresh: bool = False) -> Mapping[int, int]:
        """The registered devices of a user: device number -> registration id.

        May answer from a cache unless ``fresh``.
        """
        ...

    def forget(self, device: Address) -> None:
        """Drop whatever is cached of ``device`` and of its user's device list (it was removed)."""
        ...


class Presence(Protocol):
    """Which node holds each device's receiving session (Redis in a cluster)."""

    async def claim(
        self, device: Address, node_id: str, now_ms: int
    ) -> tuple[int, Location | None]:
        """Record ``device`` as online at ``node_id``; return (new epoch, previous location).

        The epoch is larger than any earlier epoch of the device, even across a loss of the
        presence store's data (it is at least ``now_ms * 1000``).
        """
        ...

    async def release(self, device: Address, node_id: str, epoch: int) -> None:
        """Forget ``device``'s entry if it is still the one with ``epoch`` at ``node_id``."""
        ...

    async def locate(self, devices: Sequence[Address]) -> dict[Address, Location]:
        """Locations of those ``devices`` that are online on a live node (may be cached)."""
        ...

    async def current(self, device: Address) -> Location | None:
        """``device``'s entry as the presence store holds it now, or None if it has none.

        Never answered from a cache, and whether or not the entry's node is alive: this
        is the authority on which session of the device is the newest (its epoch).
        """
        ...

    async def heartbeat(
        self, node_id: str, advertise: str, sessions: Sequence[tuple[Address, int]]
    ) -> bool:
        """Refresh this node's liveness, its link address (``advertise``) and its sessions.

        Returns False if the presence store had lost this node's state (e.g. a restart),
        so sessions may have missed wake-ups and should re-read their queues.
        """
        ...

    async def node_address(self, node_id: str) -> str | None:
        """Where a live node's link listener is reached (its ``advertise``), or None if dead."""
        ...


class NodeLinks(Protocol):
    """Batched one-way traffic to other relay nodes. Never blocks the caller."""

    def forward(self, node_id: str, items: Sequence[Pushed]) -> None:
        """Queue live envelopes for sessions on ``node_id`` (dropped if its link is full)."""
        ...

    def displace(self, node_id: str, device: Address, epoch: int) -> None:
        """Tell ``node_id`` that sessions of ``device`` older than ``epoch`` must end."""
        ...

    def offer(self, node_id: str, items: Sequence[Offered]) -> None:
        """Push envelopes direct (unstored) to sessions on ``node_id`` (see ``Notice``).

        Dropped if the link is full or down: the sender then stores them at its deadline.
        """
        ...

    def report(self, node_id: str, notices: Sequence[Notice]) -> None:
        """Tell ``node_id`` what became of envelopes it forwarded here (acks, refusals)."""
        ...

    @property
    def remote(self) -> bool:
        """Whether there can be other nodes at all (False: a single process)."""
        ...


class CoreMetrics(Protocol):
    """What the core counts; ``relay.metrics.RelayMetrics`` exports it to Prometheus.

    The core calls these on its hot path: implementations bind their series up front and
    do no per-call label lookups. Nothing here carries a tenant, user or device.
    """

    def send_seconds(self, seconds: float) -> None:
        """One send (batch or unary) took ``seconds`` from validation to answer."""
        ...

    def envelope(self, outcome: Outcome, error: ClientError | None) -> None:
        """One envelope of a send was answered ``outcome`` (``error`` when REJECTED)."""
        ...

    def copy(self, *, direct: bool) -> None:
        """One copy was DELIVERED on the direct path (``direct``) or STORED."""
        ...

    def session(self, *, receive: bool, opened: bool) -> None:
        """A receiving or send-only session opened (``opened``) or closed."""
        ...

    def displaced(self) -> None:
        """A receiving session was displaced by a newer one of its device on this node."""
        ...

    def acked(self, removed: int) -> None:
        """An ack removed ``removed`` stored envelopes."""
        ...

    def link_refused(self, reason: str) -> None:
        """Something a peer node sent was refused (``reason``: a fixed, bounded name)."""
        ...
