"""The queue's expiry index: which envelopes expire when, for ``purge_expired``.

Expired rows need no purge to disappear (their TTL drops them, and reads skip them as
soon as they expire), but the depth counters must give back what they never got acked
for, and ``purge_expired`` reports how many envelopes went. So every stored envelope
also gets an entry in ``queue_expiry``, partitioned by (expiry hour, shard) and
clustered by expiry time; ``queue_expiry_hours`` lists the hours that have entries and
how far a purge got in each.

A purge reads the due entries of each listed hour, drops those at or below their
device's ack floor (acked or purged already), keeps those whose row is still there
(unacked: an ack deletes the row), deletes those rows and decrements the depth. A
finished hour is deleted whole (partition deletes: no tombstone scans later).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from relay.common.cassandra.session import CassandraSession, Statement, partition_batches
from relay.model import Address, Envelope
from relay.stores.cassandra.layout import (
    EXPIRY_SHARDS,
    HOUR_MS,
    bucket_of,
    expiry_hour,
    expiry_shard,
    key,
    ttl_until,
)

_REGISTER_HOUR = "INSERT INTO {ks}.queue_expiry_hours (ring, hour) VALUES (0, ?) USING TTL ?"
_ENTRY = (
    "INSERT INTO {ks}.queue_expiry (hour, shard, expires_at, tenant, user, device, seq, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
)
_HOURS = "SELECT hour, done_until FROM {ks}.queue_expiry_hours WHERE ring = 0 AND hour <= ?"
_DUE = (
    "SELECT tenant, user, device, seq FROM {ks}.queue_expiry WHERE hour = ? AND shard = ?"
    " AND expires_at > ? AND expires_at <= ?"
)
_FLOOR = "SELECT floor FROM {ks}.queue_index WHERE tenant = ? AND user = ? AND device = ? LIMIT 1"
_LIVE = (
    "SELECT seq, size FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
    " AND seq IN ?"
)
#: Delete the rows at one seq (purge: every envelope there has expired).
DELETE_ROW = (
    "DELETE FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ? AND seq = ?"
)
#: Shared with the queue: delete one envelope (ack).
DELETE_MESSAGE = (
    "DELETE FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
    " AND seq = ? AND message_id = ?"
)
ADD_DEPTH = (
    "UPDATE {ks}.queue_depth SET count = count + ?, bytes = bytes + ?"
    " WHERE tenant = ? AND user = ? AND device = ?"
)
_DONE_UNTIL = "UPDATE {ks}.queue_expiry_hours SET done_until = ? WHERE ring = 0 AND hour = ?"
_DROP_HOUR = "DELETE FROM {ks}.queue_expiry_hours WHERE ring = 0 AND hour = ?"
_DROP_SHARD = "DELETE FROM {ks}.queue_expiry WHERE hour = ? AND shard = ?"
#: Expiry hours this process remembers having registered.
_REMEMBERED_HOURS = 10_000


class ExpiryIndex:
    """Writes expiry entries for stored envelopes and purges the expired, unacked ones.

    ``on_deleted(device, seqs)`` is told which rows a purge deleted.
    """

    def __init__(
        self,
        session: CassandraSession,
        bucket_ms: int,
        on_deleted: Callable[[Address, Sequence[int]], None],
    ) -> None:
        self._session = session
        self._bucket_ms = bucket_ms
        self._on_deleted = on_deleted
        self._hours: set[int] = set()

    def register(
        self, stored: Sequence[tuple[Envelope, int, int]], now_ms: int
    ) -> tuple[list[Statement], set[int]]:
        """Statements listing the expiry hours of ``stored`` (before their entries).

        Returns them with the hours to pass to ``remember`` once they are written. Hours
        already past are always written again: a purge may have dropped them.
        """
        hours: dict[int, int] = {}
        for _, expires, _ in stored:
            hour = expiry_hour(expires)
            if hour not in self._hours:
                end = (hour + 1) * HOUR_MS
                hours[hour] = max(hours.get(hour, 0), ttl_until(end, now_ms))
        statements = [(_REGISTER_HOUR, (hour, ttl)) for hour, ttl in hours.items()]
        current = expiry_hour(now_ms)
        return statements, {h for h in hours if h > current}

    def remember(self, hours: set[int]) -> None:
        """Remember ``hours`` as registered (after their statements succeeded)."""
        if len(self._hours) + len(hours) > _REMEMBERED_HOURS:
            self._hours.clear()
        self._hours.update(hours)

    def entries(
        self, stored: Sequence[tuple[Envelope, int, int]], now_ms: int
    ) -> list[list[Statement]]:
        """Batches (one partition each) writing the expiry entries of ``stored``."""
        items: list[tuple[Hashable, Statement, int]] = []
        for env, expires, seq in stored:
            hour, shard = expiry_hour(expires), expiry_shard(env.recipient)
            values = (hour, shard, expires, *key(env.recipient), seq, env.size)
            items.append(((hour, shard), (_ENTRY, (*values, ttl_until(expires, now_ms))), 64))
        return partition_batches(items)

    async def purge(self, now_ms: int) -> int:
        """Delete the unacked envelopes expired by ``now_ms``; return how many went."""
        hours = await self._session.execute(
            _HOURS, (expiry_hour(now_ms),), op="purge: list expiry hours"
        )
        purged = 0
        for hour, done_until in hours:
            low = -1 if done_until is None else int(done_until)
            due = await self._session.execute_many(
                [(_DUE, (hour, s, low, now_ms)) for s in range(EXPIRY_SHARDS)],
                op="purge: read due entries",
            )
            purged += await self._purge_entries([row for rows in due for row in rows])
            if (hour + 1) * HOUR_MS <= now_ms:
                drops = [(_DROP_SHARD, (hour, s)) for s in range(EXPIRY_SHARDS)]
                await self._session.execute_many(drops, op="purge: drop a finished hour")
                await self._session.execute(_DROP_HOUR, (hour,), op="purge: drop a finished hour")
                self._hours.discard(int(hour))
            else:
                await self._session.execute(_DONE_UNTIL, (now_ms, hour), op="purge: progress")
        return purged

    async def _purge_entries(self, entries: list[tuple[Any, ...]]) -> int:
        by_device: dict[Address, list[int]] = defaultdict(list)
        for tenant, user, device, seq in entries:
            by_device[Address(tenant, user, int(device))].append(int(seq))
        devices = list(by_device)
        floors = await self._session.execute_many(
            [(_FLOOR, key(d)) for d in devices], op="purge: read ack floors"
        )
        checks: list[tuple[Address, int, list[int]]] = []
        for device, rows in zip(devices, floors, strict=True):
            floor = int(rows[0][0] or 0) if rows else 0
            by_bucket: dict[int, list[int]] = defaultdict(list)
            for seq in by_device[device]:
                if seq > floor:  # at or below the floor: acked or purged already
                    by_bucket[bucket_of(seq, self._bucket_ms)].append(seq)
            checks.extend((device, bucket, seqs) for bucket, seqs in by_bucket.items())
        live = await self._session.execute_many(
            [(_LIVE, (*key(d), b, seqs)) for d, b, seqs in checks],
            op="purge: find unacked rows",
        )
        deletes: list[tuple[Hashable, Statement, int]] = []
        freed: dict[Address, tuple[int, int]] = {}
        gone: dict[Address, list[int]] = defaultdict(list)
        for (device, bucket, _), rows in zip(checks, live, strict=True):
            for seq, size in rows:
                deletes.append(((device, bucket), (DELETE_ROW, (*key(device), bucket, seq)), 32))
                count, total = freed.get(device, (0, 0))
                freed[device] = (count + 1, total + int(size or 0))
                gone[device].append(int(seq))
        await self._session.execute_batches(
            partition_batches(deletes), op="purge: delete expired rows"
        )
        counters = [(ADD_DEPTH, (-c, -b, *key(d))) for d, (c, b) in freed.items()]
        await self._session.execute_many(counters, op="purge: count depth", idempotent=False)
        for device, seqs in gone.items():
            self._on_deleted(device, seqs)
        return len(deletes)
