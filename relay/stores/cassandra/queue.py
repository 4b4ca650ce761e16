"""The Cassandra MessageQueue, built to avoid the queue anti-pattern.

Tables (``migrations/0001_queue.cql``, ``0005_queue_ids.cql``):

- ``queue``: partition (tenant, user, device, day bucket), clustered by ``seq``; every
  row has a TTL (its expiry plus a grace); TimeWindowCompactionStrategy by day.
- ``queue_ids``: the accepted (sender, message_id) keys, in the partition of their row
  (``ids.py``); ``queue_accepted``, layout 1's ids (no sender), is still read while
  they may be live, each copy under the sender its row names (``accepted.py``).
- ``queue_index``: per device, the static ``floor`` (every seq <= floor is acked,
  expired or purged) and one row per bucket that may hold envelopes.
- ``queue_depth``: counters of envelopes and bytes per device (the limits).
- ``queue_expiry`` and ``queue_expiry_hours``: envelopes by expiry hour (``expiry.py``).

Acks delete rows, and deleted rows are tombstones that a range read must step over. So
a read starts at ``max(after, floor)``: after an ack the floor moves to just below the
first live row, but never past ``floor_lag_ms`` below the newest seq the ack found
(seqs are made by the writers' clocks, so a write still in flight from another node, or
from one whose clock lags by less than that, lands above it; the acking node's own
clock plays no part). A read from 0 skips the acked rows instead of scanning their
tombstones. Buckets below the floor leave the index; old buckets expire whole, with
their SSTables.

Dedup and acks are keyed by (recipient, sender, message_id) (``MessageQueue``): the
same id from two senders is two envelopes, and an ack names the sender.

An append is, in the steady state, two rounds: one read round (per recipient one
lookup of its ids, and its depth; decided by ``relay.core.admission``), then one
write round: per partition one unlogged batch of its rows and their ids (one mutation:
``ids.py``), the expiry entries (batched per expiry partition) and the depth counters.
A bucket or expiry hour this process has not registered yet costs one more round
first (about once a day per device and once an hour): the index rows that make rows
and expiry entries reachable are written before them. For 20 envelopes to one device
that is 5 statements (layout 1 sent 24-32, in three dependent rounds). Residual races,
trade-offs rather than losses:

- two concurrent appends of one key (two nodes, or a retry racing its original) may
  both store it: a duplicate on the wire, which the SDK drops by (sender, message_id);
  the ack then removes both copies;
- depth is read, then counted: concurrent appends to one device may pass a limit by
  their number, and a retried counter update may count twice (counters are approximate);
- purge_expired run by several nodes at once may give back a device's depth twice;
- during a rolling upgrade from layout 1, nodes still on the old code neither see nor
  ack ids of layout 2: a duplicate on the wire, or an acked envelope that comes back
  once and is acked again on an upgraded node.

``purge(device)`` (the device was removed for good) counts the rows above the floor,
then deletes whole partitions: the device's queue buckets, its accepted ids (both
layouts) and its depth row, and last its index (so that a purge that failed half-way
is found and done again by the next one). Several nodes purging at once delete the
same partitions (each may count the same rows). An append racing the purge may leave
rows behind; they are unreachable once the index is gone and expire with their TTL.
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
from relay.core.admission import Depth, Ident, Verdict, added_depth, admit, ident, live_ids, page
from relay.model import (
    Address,
    Appended,
    Envelope,
    EnvelopeKey,
    QueuedEnvelope,
    QueueLimits,
    QueuePage,
)
from relay.stores.cassandra import layout
from relay.stores.cassandra.accepted import (
    ACCEPTED_SHARDS,
    Accepted,
    AcceptedIds,
    LegacyIdent,
)
from relay.stores.cassandra.expiry import ADD_DEPTH, DELETE_MESSAGE, ExpiryIndex
from relay.stores.cassandra.ids import Layout, QueueIds, read_layout
from relay.stores.cassandra.layout import bucket_of, key, ms_of, seq_at, ttl_until

#: How far behind the clock the ack floor stays, so that writes still in flight (or
#: from a node whose clock lags by less than this) never land below it.
DEFAULT_FLOOR_LAG_MS = 60_000
#: Most statements (a row and its id are two) in one partition's batch of an append;
#: bytes are bounded by the session's BATCH_BYTES. Single-partition batches are exempt
#: from Cassandra's batch size thresholds.
_APPEND_BATCH_ROWS = 2000
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
_ROW_SENDERS = (
    "SELECT seq, message_id, sender_tenant, sender_user, sender_device FROM {ks}.queue"
    " WHERE tenant = ? AND user = ? AND device = ? AND bucket = ? AND seq IN ?"
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


async def _nothing() -> dict[LegacyIdent, Accepted]:
    return {}


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
        self._write_turns = Turns()
        self._max_ttl_ms = max_ttl_seconds * 1000
        self._legacy = AcceptedIds(session)
        self._ids = QueueIds(session, bucket_ms, self._max_ttl_ms)
        self._layout: Layout | None = None
        self._expiry = ExpiryIndex(session, bucket_ms, self._forget_deleted)

    async def _legacy_live(self, now_ms: int) -> bool:
        """Whether ids accepted under layout 1 may still be live (read once, then kept)."""
        if self._layout is None:
            self._layout = await read_layout(self._session, self._max_ttl_ms)
        return now_ms < self._layout.legacy_until_ms

    async def _lookup(self, idents: list[Ident], now_ms: int, *, op: str) -> dict[Ident, Accepted]:
        """The records of ``idents`` (recipient, sender, message_id), both layouts, per key.

        Every record returned is a duplicate while it is live: a layout-2 id is never
        without its row (one mutation), and layout-1 records are read as keyed by sender
        (``_by_sender``).
        """
        legacy = await self._legacy_live(now_ms)
        found: dict[Ident, Accepted]
        old: dict[LegacyIdent, Accepted]
        found, old = await gather_all(
            self._ids.lookup(idents, now_ms, op=op),
            self._legacy.lookup([(d, m) for d, _, m in idents], op=op) if legacy else _nothing(),
        )
        if old:
            for ident, record in (await self._by_sender(idents, old, op=op)).items():
                known = found.get(ident)
                found[ident] = record if known is None else known.merge(record)
        return found

    async def _by_sender(
        self, idents: list[Ident], old: dict[LegacyIdent, Accepted], *, op: str
    ) -> dict[Ident, Accepted]:
        """Layout-1 records (no sender) as records of the asked keys (``accepted.py``).

        One read per queue partition of the copies' rows: a copy belongs to the sender
        its row names. A record acked under layout 1 counts as acked for every sender
        (its rows are gone, and with them its sender). A record with no row left and
        not acked is an append that failed half-way (its sender was answered
        UNAVAILABLE and retries) or an ack that did: it is no duplicate.
        """
        by_bucket: dict[tuple[Address, int], list[int]] = defaultdict(list)
        for (device, _), a in old.items():
            for seq in a.seqs:
                by_bucket[(device, bucket_of(seq, self._bucket_ms))].append(seq)
        senders: dict[tuple[Address, int, bytes], Address] = {}
        if by_bucket:
            checks = list(by_bucket.items())
            found = await self._session.execute_many(
                [(_ROW_SENDERS, (*key(d), b, seqs)) for (d, b), seqs in checks],
                op=f"{op}: read the rows of layout-1 ids",
            )
            for ((device, _), _), rows in zip(checks, found, strict=True):
                for seq, mid, st, su, sd in rows:
                    senders[(device, int(seq), bytes(mid))] = Address(str(st), str(su), int(sd))
        out: dict[Ident, Accepted] = {}
        for asked in dict.fromkeys(idents):
            device, sender, mid = asked
            record = old.get((device, mid))
            if record is None:
                continue
            mine = tuple(s for s in record.seqs if senders.get((device, s, mid)) == sender)
            if mine or record.acked:
                out[asked] = Accepted(
                    mine, record.acked, record.expires_at, record.size, legacy=mine
                )
        return out

    async def append(
        self, envelopes: Sequence[Envelope], expires_at_ms: Sequence[int], limits: QueueLimits
    ) -> list[Appended]:
        """See ``MessageQueue.append``. Durable at the session's consistency on return."""
        items = list(zip(envelopes, expires_at_ms, strict=True))
        seqs = [self._seqs.next() for _ in items]  # before any await: call order
        devices = list(dict.fromkeys(e.recipient for e, _ in items))
        now = self._clock.now_ms()
        accepted, depth_rows = await gather_all(
            self._lookup([ident(e) for e, _ in items], now, op="append"),
            self._session.execute_many([(_DEPTH, key(d)) for d in devices], op="append"),
        )
        # Past its expiry a key may be stored again (its old copy stays ackable).
        present = live_ids({i: a.expires_at for i, a in accepted.items()}, now)
        depths = {
            d: Depth(int(rows[0][0] or 0), int(rows[0][1] or 0)) if rows else Depth()
            for d, rows in zip(devices, depth_rows, strict=True)
        }
        decisions = admit([e for e, _ in items], present, depths, limits)
        stored = [
            (env, expires, seq)
            for (env, expires), seq, d in zip(items, seqs, decisions, strict=True)
            if d.verdict is Verdict.ADMITTED
        ]
        if stored:
            await self._store(stored, now)
        return [
            d.appended(seq) if d.verdict is Verdict.ADMITTED else d.appended()
            for d, seq in zip(decisions, seqs, strict=True)
        ]

    async def _store(self, stored: list[tuple[Envelope, int, int]], now: int) -> None:
        new_buckets = list(
            dict.fromkeys(
                (e.recipient, bucket_of(s, self._bucket_ms))
                for e, _, s in stored
                if (e.recipient, bucket_of(s, self._bucket_ms)) not in self._buckets
            )
        )
        first: list[Statement] = [
            (_REGISTER_BUCKET, (*key(d), b, self._bucket_ttl)) for d, b in new_buckets
        ]
        hour_rows, hours = self._expiry.register(stored, now)
        first += hour_rows
        if first:
            # The index rows that make rows and expiry entries reachable come first.
            await self._session.execute_many(first, op="append: register buckets")
            for bucket_key in new_buckets:
                _remember(self._buckets, bucket_key, None)
            self._expiry.remember(hours)
        # One round: per partition its rows and their ids (one mutation), the expiry
        # entries and the depth counters.
        rows: dict[tuple[Address, int], list[tuple[Hashable, Statement, int]]] = {}
        for env, expires, seq in stored:
            bucket = bucket_of(seq, self._bucket_ms)
            s = env.sender
            values: tuple[Any, ...] = (*key(env.recipient), bucket, seq, env.message_id)
            values += (s.tenant, s.user, s.device, env.content, env.server_timestamp_ms)
            values += (expires, env.size, ttl_until(expires, now))
            mine = rows.setdefault((env.recipient, bucket), [])
            mine.append((None, (INSERT_ROW, values), env.size))
            mine.append((None, QueueIds.record(env, expires, seq, bucket, now), 64))
        added = added_depth(e for e, _, _ in stored)
        counters = [(ADD_DEPTH, (a.count, a.bytes, *key(d))) for d, a in added.items()]
        await gather_all(
            *(self._write_partition(p, items) for p, items in rows.items()),
            self._session.execute_batches(
                self._expiry.entries(stored, now), op="append: store expiry entries"
            ),
            self._session.execute_many(counters, op="append: count depth", idempotent=False),
        )

    async def _write_partition(
        self, partition: tuple[Address, int], items: list[tuple[Hashable, Statement, int]]
    ) -> None:
        """Write one partition's rows and ids: large batches, one partition write at a time.

        Each batch is one mutation of the partition. Concurrent mutations of one
        partition contend in Cassandra's memtable (each retries its whole update), and
        the ids, clustered by random message ids, make that costly in a big partition:
        so appends of this process to one partition take turns (order is the seqs').
        """
        batches = partition_batches(items, max_rows=_APPEND_BATCH_ROWS)
        async with self._write_turns.take(partition):
            await self._session.execute_batches(batches, op="append: store envelopes")

    def resume_point(self, cursor: int) -> int:
        """See ``MessageQueue.resume_point``: ``floor_lag_ms`` below ``cursor``.

        Seqs are made by the writers' clocks: a write still in flight from another node
        (or one whose clock is behind) may land below ``cursor``, but not by more than the
        lag the ack floor also allows for.
        """
        if cursor <= 0:
            return 0
        return max(0, seq_at(ms_of(cursor) - self._floor_lag_ms) - 1)

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
        fetched = [
            QueuedEnvelope(
                int(seq),
                Envelope(
                    message_id=bytes(mid),
                    sender=Address(str(st), str(su), int(sd)),
                    recipient=device,
                    content=bytes(content),
                    server_timestamp_ms=int(ts or 0),
                ),
                int(exp),
            )
            for seq, mid, st, su, sd, content, ts, exp in rows
        ]
        return page(fetched, after, limit, now_ms)

    async def ack(self, device: Address, keys: Sequence[EnvelopeKey]) -> int:
        """See ``MessageQueue.ack``: marks the keys acked, deletes their copies, moves the floor.

        Per queue partition one batch deletes the rows and marks their keys acked (a
        layout-1 copy gets its acked ``queue_ids`` record there, under its row's sender).
        """
        now = self._clock.now_ms()
        found = await self._lookup([(device, k.sender, k.message_id) for k in keys], now, op="ack")
        newly = [(i, a) for i, a in found.items() if not a.acked and a.seqs]
        # acked ones too: that ends an ack that failed half-way
        copies = sorted({(s, mid) for (_, _, mid), a in found.items() for s in a.seqs})
        items: list[tuple[Hashable, Statement, int]] = []
        for s, mid in copies:
            bucket = bucket_of(s, self._bucket_ms)
            items.append((bucket, (DELETE_MESSAGE, (*key(device), bucket, s, mid)), 32))
        for acked, a in newly:
            items.extend(
                (place[0], QueueIds.mark_acked(device, acked[2], a, place, now), 32)
                for place in a.places
            )
            legacy: dict[int, set[int]] = defaultdict(set)
            for s in a.legacy:
                legacy[bucket_of(s, self._bucket_ms)].add(s)
            items.extend(
                (b, QueueIds.record_acked(acked, a, b, seqs, now), 32) for b, seqs in legacy.items()
            )
        batches = partition_batches(items)
        removed, freed = len(newly), sum(a.size for _, a in newly)
        counters = [(ADD_DEPTH, (-removed, -freed, *key(device)))] if removed else []
        await gather_all(
            self._session.execute_batches(batches, op="ack"),
            self._session.execute_many(counters, op="ack: count depth", idempotent=False),
        )
        if copies:
            await self._advance_floor(device, copies[0][0], copies[-1][0])
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
        drops.append(self._ids.drop(device, self._clock.now_ms()))
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

    async def _advance_floor(self, device: Address, lowest_acked: int, highest_acked: int) -> None:
        """Move the floor of ``device`` up to just below its first live row.

        Never past ``floor_lag_ms`` below ``highest_acked``, the newest seq this ack
        read (module docstring). Skipped when every acked row lies above a live row seen
        before (the floor cannot pass that one). The probe steps over the tombstones
        acked since the last move, once; reads after it start above them.
        """
        async with self._floor_turns.take(device):  # racing floor writes would regress it
            known = self._first_live.get(device)
            if known is None or lowest_acked <= known:
                # Below the smallest seq a writer whose clock is lag behind can make.
                cap = seq_at(ms_of(highest_acked) - self._floor_lag_ms) - 1
                await self._probe_floor(device, cap)

    async def _probe_floor(self, device: Address, cap: int) -> None:
        index = await self._index(device)
        if index.floor >= cap:
            # The remembered first live row may be one this ack deleted: forget it, or
            # every later ack above it would skip its probe and leave the floor here.
            self._first_live.pop(device, None)
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
