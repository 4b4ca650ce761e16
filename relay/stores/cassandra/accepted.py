"""Queue layout 1's record of accepted message ids (``queue_accepted``).

Since layout 2 (``ids.py``, migration 0005) new ids go to ``queue_ids``; this table is
only read (and acks marked in it) while ids accepted before the upgrade may still be
live, so that dedup and acks keep working across the upgrade.

Its rows are keyed by (recipient, message_id) without the sender, because layout 1
deduplicated by that. Since dedup and acks are keyed by (recipient, sender,
message_id), the queue reads a record of this table as keyed by sender like this
(``CassandraQueue._lookup``): each stored copy's queue row holds its sender, so the
copies whose rows are still there belong to the sender their rows name; a record
acked under layout 1 has no row left, so its sender is unknown, and it counts as acked
for every sender (as it did before the upgrade) until it expires. An ack of such a
copy on layout 2 writes an acked ``queue_ids`` record under the row's sender in the
batch that deletes the row, so it is precise from then on; this table is not written.

One row per (recipient, message_id) until the envelope expires (TTL): the seqs stored
under the id (normally one; two after a residual race), its size, its expiry, and
whether it was acked. An append answers DUPLICATE from it; an ack finds every copy of
an id through it. A device's ids are spread over ``ACCEPTED_SHARDS`` partitions so that
a busy device's partitions stay small, and so that an append or ack of many ids costs
one query and one batch per shard instead of one per id.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from relay.common.cassandra.session import CassandraSession, Statement, partition_batches
from relay.model import Address, Envelope
from relay.stores.cassandra.layout import key, ttl_until

#: Partitions per device for its accepted ids.
ACCEPTED_SHARDS = 16
#: Ids per IN query.
_IN_CHUNK = 100

_LOOKUP = (
    "SELECT message_id, seqs, acked, expires_at, size FROM {ks}.queue_accepted"
    " WHERE tenant = ? AND user = ? AND device = ? AND shard = ? AND message_id IN ?"
)
_RECORD = (
    "UPDATE {ks}.queue_accepted USING TTL ? SET seqs = seqs + ?, expires_at = ?, size = ?"
    " WHERE tenant = ? AND user = ? AND device = ? AND shard = ? AND message_id = ?"
)
_MARK_ACKED = (
    "UPDATE {ks}.queue_accepted USING TTL ? SET acked = true"
    " WHERE tenant = ? AND user = ? AND device = ? AND shard = ? AND message_id = ?"
)


def accepted_shard(message_id: bytes) -> int:
    """The shard of ``message_id`` among its device's accepted-id partitions."""
    return zlib.crc32(message_id) % ACCEPTED_SHARDS


@dataclass(frozen=True, slots=True)
class Accepted:
    """What is known about one accepted id.

    ``places``: the (queue partition bucket, sender) of each ``queue_ids`` row that holds
    it (layout 2, ``ids.py``); empty for an id found in this module's ``queue_accepted``
    (layout 1). ``legacy``: the seqs among ``seqs`` recorded only in ``queue_accepted``.
    """

    seqs: tuple[int, ...]
    acked: bool
    expires_at: int
    size: int
    places: tuple[tuple[int, Address], ...] = ()
    legacy: tuple[int, ...] = ()

    @property
    def buckets(self) -> set[int]:
        """The queue partitions whose ``queue_ids`` hold the id (layout 2)."""
        return {bucket for bucket, _ in self.places}

    def merge(self, other: Accepted) -> Accepted:
        """One record of an id found twice (two partitions, or both layouts).

        Every copy stays reachable (seqs and places are joined); the record that
        expires last says whether the id is acked, its expiry and size.
        """
        last = self if self.expires_at >= other.expires_at else other
        return Accepted(
            seqs=tuple(sorted(set(self.seqs) | set(other.seqs))),
            acked=last.acked,
            expires_at=last.expires_at,
            size=last.size,
            places=tuple(dict.fromkeys(self.places + other.places)),
            legacy=tuple(sorted(set(self.legacy) | set(other.legacy))),
        )


#: Layout 1's key of an accepted id: (recipient, message_id), no sender.
LegacyIdent = tuple[Address, bytes]


class AcceptedIds:
    """Reads and writes ``queue_accepted`` for the queue."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session

    async def lookup(
        self, idents: Iterable[LegacyIdent], *, op: str
    ) -> dict[LegacyIdent, Accepted]:
        """The accepted ids among ``idents`` (one IN query per partition and chunk)."""
        by_partition: dict[tuple[Address, int], list[bytes]] = defaultdict(list)
        for device, mid in dict.fromkeys(idents):
            by_partition[(device, accepted_shard(mid))].append(mid)
        queries: list[tuple[Address, Statement]] = []
        for (device, shard), mids in by_partition.items():
            for i in range(0, len(mids), _IN_CHUNK):
                chunk = mids[i : i + _IN_CHUNK]
                queries.append((device, (_LOOKUP, (*key(device), shard, chunk))))
        found = await self._session.execute_many([q for _, q in queries], op=op)
        out: dict[LegacyIdent, Accepted] = {}
        for (device, _), rows in zip(queries, found, strict=True):
            for mid, seqs, acked, expires_at, size in rows:
                out[(device, bytes(mid))] = Accepted(
                    seqs=tuple(sorted(int(s) for s in seqs or ())),
                    acked=bool(acked),
                    expires_at=int(expires_at or 0),
                    size=int(size or 0),
                )
        return out

    @staticmethod
    def record(stored: Sequence[tuple[Envelope, int, int]], now_ms: int) -> list[list[Statement]]:
        """Batches recording each stored (envelope, expires_at, seq) under its id."""
        items: list[tuple[Hashable, Statement, int]] = []
        for env, expires, seq in stored:
            shard = accepted_shard(env.message_id)
            ttl = ttl_until(expires, now_ms)
            row = (ttl, {seq}, expires, env.size, *key(env.recipient), shard, env.message_id)
            items.append(((env.recipient, shard), (_RECORD, row), 64))
        return partition_batches(items)

    @staticmethod
    def mark_acked(
        device: Address, acked: Sequence[tuple[bytes, Accepted]], now_ms: int
    ) -> list[list[Statement]]:
        """Batches marking ids of ``device`` acked (kept, so a resend stays DUPLICATE)."""
        items: list[tuple[Hashable, Statement, int]] = []
        for mid, accepted in acked:
            shard = accepted_shard(mid)
            ttl = ttl_until(accepted.expires_at, now_ms)
            items.append((shard, (_MARK_ACKED, (ttl, *key(device), shard, mid)), 64))
        return partition_batches(items)
