"""The Cassandra MessageQueue, built to avoid the queue anti-pattern.

Tables (``migrations/0001_queue.cql``):

- ``queue``: partition (tenant, user, device, day bucket), clustered by ``seq``; every
  row has a TTL (its expiry plus a grace); TimeWindowCompactionStrategy by day.
- ``queue_index``: per device, the static ``floor`` (every seq <= floor is acked,
  expired or purged) and one row per bucket that may hold envelopes.
- ``queue_accepted``: the accepted message ids (``accepted.py``).
- ``queue_depth``: counters of envelopes and bytes per device (the limits).
- ``queue_expiry`` and ``queue_expiry_hours``: envelopes by expiry hour (``expiry.py``).

Acks delete rows, and deleted rows are tombstones that a range read must step over. So
a read starts at ``max(after, floor)``: after an ack the floor moves to just below the
first live row (but stays ``floor_lag_ms`` behind the clock, so that a write still in
flight from another node cannot land below it), and a read from 0 skips the acked rows
instead of scanning their tombstones. Buckets below the floor leave the index; old
buckets expire whole, with their SSTables.

An append is three rounds of concurrent prepared statements, batched per partition:
read (accepted ids, depth), record the ids, then write rows, expiry entries and depth
counters. The id is recorded before its row, so every stored row is reachable from its
id (an ack finds every copy), and a retry after a half-done append finds the id without
a row and stores it again. Residual races, trade-offs rather than losses:

- two concurrent appends of one id (two nodes, or a retry racing its original) may
  both store it: a duplicate on the wire, which the SDK drops by message_id; the ack
  then removes both copies;
- depth is read, then counted: concurrent appends to one device may pass a limit by
  their number, and a retried counter update may count twice (counters are approximate);
- purge_expired run by several nodes at once may give back a device's depth twice.

``purge(device)`` (the device was removed for good) counts the rows above the floor,
then deletes whole partitions: the device's queue buckets, its accepted ids and its
depth row, and last its index (so that a purge that failed half-way is found and done
again by the next one). Several nodes purging at once delete the same partitions (each
may count the same rows). An append racing the purge may leave rows behind; they are
unreachable once the index is gone and expire with their TTL.
"""

from __future__ import annotations

import collections
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.clock import Clock
from relay.common.cassandra.session import (
    CassandraSession,
    Statement,
    gather_all,
    partition_batches,
)
from relay.common.cassandra.turns import Turns
from relay.config import DEFAULT_TTL_SECONDS
from relay.model import (
    Address,
    Appended,
    Envelope,
    Outcome,
    QueuedEnvelope,
    QueueLimits,
    QueuePage,
)
from relay.stores.cassandra import layout
from relay.stores.cassandra.accepted import ACCEPTED_SHARDS, Accepted, AcceptedIds, Ident
from relay.stores.cassandra.expiry import ADD_DEPTH, DELETE_MESSAGE, ExpiryIndex
from relay.stores.cassandra.layout import bucket_of, key, seq_at, ttl_until

#: How far behind the clock the ack floor stays, so that writes still in flight (or
#: from a node whose clock lags by less than this) never land below it.
DEFAULT_FLOOR_LAG_MS = 60_000
#: Devices (and buckets) this process remembers, to skip needless probes and writes.
_REMEMBERED = 100_000
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")

_INDEX = "SELECT floor, bucket FROM {ks}.queue_index WHERE tenant = ? AND user = ? AND device = ?"
_REGISTER_BUCKET = (
    "INSERT INTO {ks}.queue_index (tenant, user, device, bucket) VALUES (?, ?, ?, ?) USING TTL ?"
)
_SET_FLOOR = "UPDATE {ks}.queue_index SET floor = ? WHERE tenant = ? AND user = ? AND device = ?"
_DROP_BUCKETS = (
    "DELETE FROM {ks}.queue_index WHERE tenant = ? AND user = ? AND device = ? AND bucket < ?"
)
_DEPTH = "SELECT count, bytes FROM {ks}.queue_depth WHERE tenant = ? AND user = ? AND device = ?"
#: The row insert of an append (also what ``loadtest/storebench.py`` times raw).
INSERT_ROW = (
    "INSERT INTO {ks}.queue (tenant, user, device, bucket, seq, message_id, sender_tenant,"
    " sender_user, sender_device, content, server_ts, expires_at, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
)
_LIVE_SEQS = (
    "SELECT seq FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
    " AND seq IN ?"
)
_PAGE = (
    "SELECT seq, message_id, sender_tenant, sender_user, sender_device, content, server_ts,"
    " expires_at FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
    " AND seq > ? LIMIT ?"
)
_FIRST = (
    "SELECT seq FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
    " AND seq > ? LIMIT 1"
)
_COUNT = (
    "SELECT COUNT(*) FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
    " AND seq > ?"
)
_DROP_BUCKET = "DELETE FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
_DROP_ACCEPTED = (
    "DELETE FROM {ks}.queue_accepted WHERE tenant = ? AND user = ? AND device = ? AND shard = ?"
)
_DROP_DEPTH = "DELETE FROM {ks}.queue_depth WHERE tenant = ? AND user = ? AND device = ?"
_DROP_INDEX = "DELETE FROM {ks}.queue_index WHERE tenant = ? AND user = ? AND device = ?"


@dataclass(frozen=True, slots=True)
class _Index:
    floor: int
    buckets: tuple[int, ...]


def _remember(cache: collections.OrderedDict[_K, _V], k: _K, v: _V) -> None:
    cache[k] = v
    cache.move_to_end(k)
    while len(cache) > _REMEMBERED:
        cache.popitem(last=False)


class CassandraQueue:
    """MessageQueue on Cassandra (see ``relay.core.ports.MessageQueue`` for the contract).

    ``session`` is open and owned by the caller. ``clock`` (the relay's) makes seqs and
    TTLs and bounds the ack floor. ``max_ttl_seconds`` is the longest envelope lifetime
    (``limits.max_ttl_seconds``).
    """

    def __init__(
        self,
        session: CassandraSession,
        clock: Clock,
        *,
        max_ttl_seconds: int = DEFAULT_TTL_SECONDS,
        bucket_ms: int = layout.DEFAULT_BUCKET_MS,
        floor_lag_ms: int = DEFAULT_FLOOR_LAG_MS,
    ) -> None:
        self._session = session
        self._clock = clock
        self._seqs = layout.SeqSource(clock)
        self._bucket_ms = bucket_ms
        self._floor_lag_ms = floor_lag_ms
        # A bucket's index row outlives every row written into the bucket (written
        # while the clock is inside it, with TTLs of at most max_ttl plus the grace).
        self._bucket_ttl = ttl_until(bucket_ms + max_ttl_seconds * 1000, 0)
        self._buckets: collections.OrderedDict[tuple[Address, int], None] = (
            collections.OrderedDict()
        )
        self._first_live: collections.OrderedDict[Address, int] = collections.OrderedDict()
        self._floor_turns = Turns()
        self._accepted = AcceptedIds(session)
        self._expiry = ExpiryIndex(session, bucket_ms, self._forget_deleted)

    async def append(
        self, envelopes: Sequence[Envelope], expires_at_ms: Sequence[int], limits: QueueLimits
    ) -> list[Appended]:
        """See ``MessageQueue.append``. Durable at the session's consistency on return."""
        items = list(zip(envelopes, expires_at_ms, strict=True))
        seqs = [self._seqs.next() for _ in items]  # before any await: call order
        devices = list(dict.fromkeys(e.recipient for e, _ in items))
        accepted, depths = await gather_all(
            self._accepted.lookup(((e.recipient, e.message_id) for e, _ in items), op="append"),
            self._session.execute_many([(_DEPTH, key(d)) for d in devices], op="append"),
        )
        now = self._clock.now_ms()
        # Past its expiry an id may be stored again (its old copy stays ackable).
        accepted = {i: a for i, a in accepted.items() if a.expires_at > now}
        present = await self._present(accepted)
        depth = {
            d: (int(rows[0][0] or 0), int(rows[0][1] or 0)) if rows else (0, 0)
            for d, rows in zip(devices, depths, strict=True)
        }
        results: list[Appended] = []
        stored: list[tuple[Envelope, int, int]] = []
        seen: set[Ident] = set()
        for (env, expires), seq in zip(items, seqs, strict=True):
            ident = (env.recipient, env.message_id)
            if ident in seen or ident in present:
                results.append(Appended(Outcome.DUPLICATE))
                continue
            count, size = depth[env.recipient]
            if count + 1 > limits.max_depth:
                results.append(Appended(Outcome.REJECTED, limit="max_queue_depth"))
                continue
            if size + env.size > limits.max_bytes:
                results.append(Appended(Outcome.REJECTED, limit="max_queue_bytes"))
                continue
            seen.add(ident)
            depth[env.recipient] = (count + 1, size + env.size)
            stored.append((env, expires, seq))
            results.append(Appended(Outcome.STORED, seq=seq))
        if stored:
            await self._store(stored)
        return results

    async def _present(self, accepted: dict[Ident, Accepted]) -> set[Ident]:
        """The accepted ids that are duplicates: acked, or with a stored row.

        An id recorded without a row is an append that failed half-way (its sender was
        answered UNAVAILABLE and retries): it is stored again.
        """
        present = {i for i, a in accepted.items() if a.acked}
        by_bucket: dict[tuple[Address, int], list[int]] = defaultdict(list)
        owner: dict[tuple[Address, int], Ident] = {}
        for ident, a in accepted.items():
            for seq in () if a.acked else a.seqs:
                by_bucket[(ident[0], bucket_of(seq, self._bucket_ms))].append(seq)
                owner[(ident[0], seq)] = ident
        checks = list(by_bucket.items())
        found = await self._session.execute_many(
            [(_LIVE_SEQS, (*key(d), b, seqs)) for (d, b), seqs in checks],
            op="append: check retried messages",
        )
        for ((device, _), _), rows in zip(checks, found, strict=True):
            present.update(owner[(device, int(row[0]))] for row in rows)
        return present

    async def _store(self, stored: list[tuple[Envelope, int, int]]) -> None:
        now = self._clock.now_ms()
        first = self._accepted.record(stored, now)
        new_buckets = list(
            dict.fromkeys(
                (e.recipient, bucket_of(s, self._bucket_ms))
                for e, _, s in stored
                if (e.recipient, bucket_of(s, self._bucket_ms)) not in self._buckets
            )
        )
        first += [[(_REGISTER_BUCKET, (*key(d), b, self._bucket_ttl))] for d, b in new_buckets]
        hour_rows, hours = self._expiry.register(stored, now)
        first += [[row] for row in hour_rows]
        # Round 1: the ids, and the index rows that make rows and expiry entries reachable.
        await self._session.execute_batches(first, op="append: record message ids")
        for bucket_key in new_buckets:
            _remember(self._buckets, bucket_key, None)
        self._expiry.remember(hours)
        # Round 2: the rows, their expiry entries and the depth counters.
        rows: list[tuple[Hashable, Statement, int]] = []
        added: dict[Address, tuple[int, int]] = {}
        for env, expires, seq in stored:
            bucket = bucket_of(seq, self._bucket_ms)
            s = env.sender
            values: tuple[Any, ...] = (*key(env.recipient), bucket, seq, env.message_id)
            values += (s.tenant, s.user, s.device, env.content, env.server_timestamp_ms)
            values += (expires, env.size, ttl_until(expires, now))
            rows.append(((env.recipient, bucket), (INSERT_ROW, values), env.size))
            count, size = added.get(env.recipient, (0, 0))
            added[env.recipient] = (count + 1, size + env.size)
        batches = partition_batches(rows) + self._expiry.entries(stored, now)
        counters = [(ADD_DEPTH, (c, b, *key(d))) for d, (c, b) in added.items()]
        await gather_all(
            self._session.execute_batches(batches, op="append: store envelopes"),
            self._session.execute_many(counters, op="append: count depth", idempotent=False),
        )

    async def read(self, device: Address, after: int, limit: int, now_ms: int) -> QueuePage:
        """See ``MessageQueue.read``: from ``max(after, ack floor)``, bucket by bucket."""
        index = await self._index(device)
        start = max(after, index.floor)
        want = limit + 1
        rows: list[tuple[Any, ...]] = []
        for bucket in index.buckets:
            if bucket < bucket_of(start, self._bucket_ms):
                continue
            rows += await self._session.execute(
                _PAGE, (*key(device), bucket, start, want - len(rows)), op="read"
            )
            if len(rows) >= want:
                break
        items: list[QueuedEnvelope] = []
        cursor = after
        for seq, mid, st, su, sd, content, ts, exp in rows[:limit]:
            cursor = int(seq)
            if int(exp) <= now_ms:
                continue  # expired: skipped here, deleted by purge_expired
            env = Envelope(
                message_id=bytes(mid),
                sender=Address(str(st), str(su), int(sd)),
                recipient=device,
                content=bytes(content),
                server_timestamp_ms=int(ts or 0),
            )
            items.append(QueuedEnvelope(cursor, env, int(exp)))
        return QueuePage(tuple(items), cursor, len(rows) > limit)

    async def ack(self, device: Address, message_ids: Sequence[bytes]) -> int:
        """See ``MessageQueue.ack``: marks the ids acked, deletes every copy, moves the floor."""
        found = await self._accepted.lookup(((device, m) for m in message_ids), op="ack")
        newly = [(mid, a) for (_, mid), a in found.items() if not a.acked and a.seqs]
        # acked ones too: that ends an ack that failed half-way
        copies = sorted((s, mid) for (_, mid), a in found.items() for s in a.seqs)
        seqs = [s for s, _ in copies]
        deletes = partition_batches(
            (
                bucket_of(s, self._bucket_ms),
                (DELETE_MESSAGE, (*key(device), bucket_of(s, self._bucket_ms), s, mid)),
                32,
            )
            for s, mid in copies
        )
        marks = self._accepted.mark_acked(device, newly, self._clock.now_ms())
        removed, freed = len(newly), sum(a.size for _, a in newly)
        counters = [(ADD_DEPTH, (-removed, -freed, *key(device)))] if removed else []
        await gather_all(
            self._session.execute_batches(marks + deletes, op="ack"),
            self._session.execute_many(counters, op="ack: count depth", idempotent=False),
        )
        if seqs:
            await self._advance_floor(device, seqs[0])
        return removed

    async def purge_expired(self, now_ms: int) -> int:
        """See ``MessageQueue.purge_expired``; accepted ids expire by their TTL."""
        return await self._expiry.purge(now_ms)

    async def purge(self, device: Address) -> int:
        """See ``MessageQueue.purge``: partition deletes, the index last (module docstring)."""
        index = await self._index(device)
        counts = await self._session.execute_many(
            [(_COUNT, (*key(device), b, index.floor)) for b in index.buckets],
            op="purge a device: count its envelopes",
        )
        drops: list[Statement] = [(_DROP_BUCKET, (*key(device), b)) for b in index.buckets]
        drops += [(_DROP_ACCEPTED, (*key(device), s)) for s in range(ACCEPTED_SHARDS)]
        drops.append((_DROP_DEPTH, key(device)))
        await self._session.execute_many(drops, op="purge a device: delete its queue")
        await self._session.execute(_DROP_INDEX, key(device), op="purge a device: drop its index")
        self._first_live.pop(device, None)
        for remembered in [k for k in self._buckets if k[0] == device]:
            del self._buckets[remembered]  # so that a later append registers its bucket again
        return sum(int(rows[0][0] or 0) for rows in counts if rows)

    async def depth(self, device: Address) -> tuple[int, int]:
        """Envelopes and bytes waiting in ``device``'s queue (approximate; for metrics)."""
        rows = await self._session.execute(_DEPTH, key(device), op="depth")
        return (int(rows[0][0] or 0), int(rows[0][1] or 0)) if rows else (0, 0)

    async def floor(self, device: Address) -> int:
        """The ack floor of ``device``: every seq at or below it is gone (diagnostics)."""
        return (await self._index(device)).floor

    async def _index(self, device: Address) -> _Index:
        rows = await self._session.execute(_INDEX, key(device), op="read the queue index")
        floor = int(rows[0][0] or 0) if rows else 0
        return _Index(floor, tuple(sorted(int(b) for _, b in rows if b is not None)))

    async def _advance_floor(self, device: Address, lowest_acked: int) -> None:
        """Move the floor of ``device`` up to just below its first live row.

        Skipped when every acked row lies above a live row seen before (the floor
        cannot pass that one). The probe steps over the tombstones acked since the last
        move, once; reads after it start above them.
        """
        async with self._floor_turns.take(device):  # racing floor writes would regress it
            known = self._first_live.get(device)
            if known is None or lowest_acked <= known:
                await self._probe_floor(device)

    async def _probe_floor(self, device: Address) -> None:
        index = await self._index(device)
        cap = seq_at(self._clock.now_ms() - self._floor_lag_ms)
        if index.floor >= cap:
            return
        first: int | None = None
        for bucket in index.buckets:
            if bucket < bucket_of(index.floor, self._bucket_ms):
                continue
            rows = await self._session.execute(
                _FIRST, (*key(device), bucket, index.floor), op="ack: probe the floor"
            )
            if rows:
                first = int(rows[0][0])
                break
        if first is None:
            self._first_live.pop(device, None)
        else:
            _remember(self._first_live, device, first)
        floor = cap if first is None else min(first - 1, cap)
        if floor <= index.floor:
            return
        writes: list[Statement] = [(_SET_FLOOR, (floor, *key(device)))]
        below = bucket_of(floor, self._bucket_ms)
        if any(b < below for b in index.buckets):
            writes.append((_DROP_BUCKETS, (*key(device), below)))
        await self._session.execute_many(writes, op="ack: move the floor")

    def _forget_deleted(self, device: Address, seqs: Sequence[int]) -> None:
        """Rows of ``device`` were purged: a remembered first live row may be gone."""
        known = self._first_live.get(device)
        if known is not None and known in seqs:
            del self._first_live[device]
