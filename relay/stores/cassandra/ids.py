"""Queue layout 2: accepted message ids beside their rows (``queue_ids``, migration 0005).

An accepted id is a row of ``queue_ids`` (clustered by message_id, then sender) in the
partition of the envelope it accepted:
``queue_ids`` has ``queue``'s partition key (tenant, user, device, bucket), so the rows
and ids of one partition go in one unlogged single-partition batch, which each replica
applies as one mutation. Hence every stored row is reachable from its id (an ack finds
every copy) and no id is ever recorded without its row, in one round of writes.

Looking an id up is one query per device and chunk of ids,
``bucket IN <window> AND message_id IN <ids>``, where the window is every bucket an
unexpired id can be in: from the bucket of ``now - max_ttl`` to the current bucket,
one bucket of slack on each side for writers' clock skew (33 partitions for day
buckets and a 30-day TTL). Partitions that do not exist cost the replica a bloom
filter check each; the statement is one round trip.

Dedup and acks are by (recipient, sender, message_id): the sender is in the row key
(as migration 0005 made it), so a lookup returns one record per sender of an id and
only the asked senders' records count; the rows of one id from several senders are
never merged. This needed no new migration or layout: every ``queue_ids`` row was
written under its envelope's authenticated sender, so the rows written before this
keying are read exactly as the rows written after it. (During a rolling upgrade, nodes
still on the older code merge the senders of one id: a second sender's envelope may be
answered DUPLICATE there, and their acks remove every sender's copy of an id.)

Layout 1 (``accepted.py``: ``queue_accepted``, 16 shard partitions per device) is read
too while ids accepted under it may be live (``Layout.legacy_until_ms``), so an
upgrade keeps dedup and acks working; new ids are never written there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.common.cassandra.session import CassandraSession, Statement
from relay.core.admission import Ident
from relay.errors import Unavailable
from relay.model import Address, Envelope
from relay.stores.cassandra.accepted import Accepted
from relay.stores.cassandra.layout import TTL_GRACE_SECONDS, bucket_of, key, seq_at, ttl_until

#: The queue layout this code writes (``queue_layout.version``).
LAYOUT_VERSION = 2
#: Ids per IN query.
_IN_CHUNK = 100

_LOOKUP = (
    "SELECT bucket, message_id, sender_tenant, sender_user, sender_device, seqs, acked,"
    " expires_at, size FROM {ks}.queue_ids"
    " WHERE tenant = ? AND user = ? AND device = ? AND bucket IN ? AND message_id IN ?"
)
_ID_ROW = (
    " WHERE tenant = ? AND user = ? AND device = ? AND bucket = ? AND message_id = ?"
    " AND sender_tenant = ? AND sender_user = ? AND sender_device = ?"
)
RECORD = (
    "UPDATE {ks}.queue_ids USING TTL ? SET seqs = seqs + ?, expires_at = ?, size = ?,"
    " acked = false" + _ID_ROW
)
MARK_ACKED = "UPDATE {ks}.queue_ids USING TTL ? SET acked = true" + _ID_ROW
#: A layout-1 copy acked on layout 2: its record, acked, under its row's sender.
RECORD_ACKED = (
    "UPDATE {ks}.queue_ids USING TTL ? SET seqs = seqs + ?, expires_at = ?, size = ?,"
    " acked = true" + _ID_ROW
)
_DROP = "DELETE FROM {ks}.queue_ids WHERE tenant = ? AND user = ? AND device = ? AND bucket IN ?"
_LAYOUT = "SELECT version, upgraded_at, legacy_ids FROM {ks}.queue_layout WHERE ring = 0"
_ANY_LEGACY = "SELECT shard FROM {ks}.queue_accepted LIMIT 1"
_NO_LEGACY = "UPDATE {ks}.queue_layout SET legacy_ids = false WHERE ring = 0"


def id_window(now_ms: int, max_ttl_ms: int, bucket_ms: int) -> list[int]:
    """Every bucket that can hold an id still live at ``now_ms`` (module docstring)."""
    low = bucket_of(seq_at(now_ms - max_ttl_ms), bucket_ms) - 1
    high = bucket_of(seq_at(now_ms), bucket_ms) + 1
    return list(range(max(0, low), high + 1))


@dataclass(frozen=True, slots=True)
class Layout:
    """The keyspace's queue layout: layout-1 ids may be live until ``legacy_until_ms``."""

    version: int
    legacy_until_ms: int


async def read_layout(session: CassandraSession, max_ttl_ms: int) -> Layout:
    """The keyspace's layout; Unavailable (saying to migrate) if it predates layout 2."""
    rows = await session.execute(_LAYOUT, op="read the queue layout")
    if not rows or rows[0][0] is None or int(rows[0][0]) < LAYOUT_VERSION:
        raise Unavailable(
            f"cassandra keyspace {session.keyspace!r} is not on queue layout {LAYOUT_VERSION}:"
            " run `relayd migrate` (migration 0005_queue_ids)"
        )
    version, upgraded_at, legacy = rows[0]
    until = 0
    if legacy:
        # upgraded_at is a datetime from the driver; the longest-lived layout-1 id was
        # accepted before it and lives at most max_ttl, plus the rows' grace.
        upgraded_ms = int(upgraded_at.timestamp() * 1000) if upgraded_at is not None else 0
        until = upgraded_ms + max_ttl_ms + TTL_GRACE_SECONDS * 1000
    return Layout(int(version), until)


async def after_migration(session: CassandraSession) -> None:
    """Run by ``relayd migrate`` after 0005: no layout-1 ids at all means none to read."""
    if not await session.execute(_ANY_LEGACY, op="migrate: look for layout-1 ids"):
        await session.execute(_NO_LEGACY, op="migrate: record that no layout-1 ids exist")


class QueueIds:
    """Reads and writes ``queue_ids`` for the queue (module docstring)."""

    def __init__(self, session: CassandraSession, bucket_ms: int, max_ttl_ms: int) -> None:
        self._session = session
        self._bucket_ms = bucket_ms
        self._max_ttl_ms = max_ttl_ms

    def window(self, now_ms: int) -> list[int]:
        """The buckets a live id can be in at ``now_ms``."""
        return id_window(now_ms, self._max_ttl_ms, self._bucket_ms)

    async def lookup(
        self, idents: Iterable[Ident], now_ms: int, *, op: str
    ) -> dict[Ident, Accepted]:
        """The records of ``idents`` (recipient, sender, id): one query per device and 100 ids.

        A record of one id from another sender than those asked is not returned.
        """
        asked = set(idents)
        by_device: dict[Address, list[bytes]] = {}
        for device, _, mid in asked:
            by_device.setdefault(device, []).append(mid)
        for device, mids in by_device.items():
            by_device[device] = sorted(set(mids))
        window = self.window(now_ms)
        queries: list[tuple[Address, Statement]] = []
        for device, mids in by_device.items():
            for i in range(0, len(mids), _IN_CHUNK):
                chunk = mids[i : i + _IN_CHUNK]
                queries.append((device, (_LOOKUP, (*key(device), window, chunk))))
        found = await self._session.execute_many([q for _, q in queries], op=op)
        out: dict[Ident, Accepted] = {}
        for (device, _), rows in zip(queries, found, strict=True):
            for bucket, mid, st, su, sd, seqs, acked, expires_at, size in rows:
                sender = Address(str(st), str(su), int(sd))
                ident = (device, sender, bytes(mid))
                if ident not in asked:
                    continue
                record = Accepted(
                    seqs=tuple(sorted(int(s) for s in seqs or ())),
                    acked=bool(acked),
                    expires_at=int(expires_at or 0),
                    size=int(size or 0),
                    places=((int(bucket), sender),),
                )
                known = out.get(ident)
                out[ident] = record if known is None else known.merge(record)
        return out

    @staticmethod
    def record(env: Envelope, expires_at: int, seq: int, bucket: int, now_ms: int) -> Statement:
        """The statement recording ``env``'s id, for the batch of its row's partition."""
        ttl = ttl_until(expires_at, now_ms)
        row = (ttl, {seq}, expires_at, env.size, *key(env.recipient), bucket, env.message_id)
        return (RECORD, (*row, *key(env.sender)))

    @staticmethod
    def mark_acked(
        device: Address,
        message_id: bytes,
        accepted: Accepted,
        place: tuple[int, Address],
        now_ms: int,
    ) -> Statement:
        """The statement marking one row of an id acked (kept: a resend stays DUPLICATE)."""
        ttl = ttl_until(accepted.expires_at, now_ms)
        bucket, sender = place
        return (MARK_ACKED, (ttl, *key(device), bucket, message_id, *key(sender)))

    @staticmethod
    def record_acked(
        ident: Ident, accepted: Accepted, bucket: int, seqs: set[int], now_ms: int
    ) -> Statement:
        """The statement recording layout-1 copies (``seqs`` in ``bucket``) acked here.

        For the batch that deletes their rows: from then on the key ``ident``
        (recipient, sender, message_id) is found, acked, in ``queue_ids`` under its
        sender (the sender the rows named).
        """
        device, sender, message_id = ident
        ttl = ttl_until(accepted.expires_at, now_ms)
        row = (ttl, seqs, accepted.expires_at, accepted.size, *key(device), bucket, message_id)
        return (RECORD_ACKED, (*row, *key(sender)))

    def drop(self, device: Address, now_ms: int) -> Statement:
        """The statement deleting every id partition of ``device`` that may hold live ids."""
        return (_DROP, (*key(device), self.window(now_ms)))
