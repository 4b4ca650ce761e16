"""The embedded MessageQueue: per-device queues in one SQLite file, fsync'd on commit.

``queue.id`` is an AUTOINCREMENT key, never reused, so it orders every device's queue
and serves as the read cursor. ``accepted`` remembers every (sender, message_id) per
recipient until it expires, so a retried send after an ack is still a duplicate, while
the same id from another sender is another envelope. ``depth`` keeps count and bytes
per device so that limits cost one row lookup, not a scan.

Schema versions (``PRAGMA user_version``): 0 is the first schema, which deduplicated
and acked by (recipient, message_id): its ``accepted`` had no sender and ``queue`` had a
unique index without one. ``open`` upgrades such a file to version 2 in one
transaction (``_migrate``): every accepted id whose row is still queued takes the
sender from that row (the row always held it); an id already acked or expired has no
row left, so its sender is unknown and it is kept with the sender ``LEGACY_SENDER``,
which counts as every sender (as before the upgrade) until the record expires. So no
id accepted before the upgrade stops being a duplicate for its own sender; only a
pre-upgrade id that was acked keeps blocking other senders, and for at most the TTL it
was accepted with.

Appends and acks are set-at-a-time: an append of N envelopes to R recipients runs about
2R + 4 statements (per recipient one ``IN (...)`` probe of ``accepted`` and one depth
read; then one ``executemany`` each for the queue rows, the accepted ids and the depth
upserts), not 5N; an ack is one ``DELETE ... IN (...) RETURNING`` per 500 keys and one
depth update.
Queue ids are given explicitly, counting up from the largest id ever used, which is what
AUTOINCREMENT would give them: the append runs inside the writer's transaction, the only
writer, so nothing can take an id in between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.clock import Clock, SystemClock
from relay.common.sqlite_worker import SqliteWorker
from relay.core.admission import (
    Depth,
    Ident,
    Verdict,
    added_depth,
    admit,
    ident,
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
from relay.resource import AsyncResource

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    sender_tenant TEXT NOT NULL, sender_user TEXT NOT NULL, sender_device INTEGER NOT NULL,
    content BLOB NOT NULL,
    server_ts INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_device ON queue (tenant, user, device, id);
CREATE UNIQUE INDEX IF NOT EXISTS queue_key ON queue
    (tenant, user, device, message_id, sender_tenant, sender_user, sender_device);
CREATE INDEX IF NOT EXISTS queue_expiry ON queue (expires_at);
CREATE TABLE IF NOT EXISTS accepted (
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    sender_tenant TEXT NOT NULL, sender_user TEXT NOT NULL, sender_device INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device, message_id, sender_tenant, sender_user, sender_device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accepted_expiry ON accepted (expires_at);
CREATE TABLE IF NOT EXISTS depth (
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
"""


#: The schema version this code writes (``PRAGMA user_version``; module docstring).
SCHEMA_VERSION = 2
#: The sender of an id accepted under schema 0 whose row was gone at the upgrade: it
#: counts as every sender. No address has an empty tenant, so no sender is it.
LEGACY_SENDER = Address("", "", -1)

#: Schema 0 -> 2 (``_migrate``). ``accepted`` is rebuilt with the sender in its key.
_MIGRATE_0_TO_2 = (
    "CREATE TABLE accepted_v2 ("
    " tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,"
    " message_id BLOB NOT NULL,"
    " sender_tenant TEXT NOT NULL, sender_user TEXT NOT NULL, sender_device INTEGER NOT NULL,"
    " expires_at INTEGER NOT NULL,"
    " PRIMARY KEY (tenant, user, device, message_id, sender_tenant, sender_user,"
    " sender_device)) WITHOUT ROWID",
    # Schema 0 held at most one row per (recipient, message_id) (its unique index).
    "INSERT INTO accepted_v2 SELECT a.tenant, a.user, a.device, a.message_id,"
    " coalesce(q.sender_tenant, ?), coalesce(q.sender_user, ?), coalesce(q.sender_device, ?),"
    " a.expires_at FROM accepted a LEFT JOIN queue q ON q.tenant = a.tenant"
    " AND q.user = a.user AND q.device = a.device AND q.message_id = a.message_id",
    "DROP TABLE accepted",
    "ALTER TABLE accepted_v2 RENAME TO accepted",
    "CREATE INDEX IF NOT EXISTS accepted_expiry ON accepted (expires_at)",
)


def _key(a: Address) -> tuple[str, str, int]:
    return (a.tenant, a.user, a.device)


def _migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION (module docstring); return the version found."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found >= SCHEMA_VERSION:
        return found
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(accepted)")}
    if "sender_tenant" not in columns:  # schema 0 (SCHEMA's CREATE kept the old table)
        legacy = _key(LEGACY_SENDER)
        for i, statement in enumerate(_MIGRATE_0_TO_2):
            conn.execute(statement, legacy if i == 1 else ())
    conn.execute("DROP INDEX IF EXISTS queue_message")  # schema 0's, without the sender
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found


class SqliteQueue(AsyncResource):
    """MessageQueue on SQLite (see ``relay.core.ports.MessageQueue`` for the contract).

    ``clock`` (the relay's) says when an accepted id has expired, so that it may be
    stored again (``relay.core.admission.live_ids``).
    """

    def __init__(self, path: Path, *, clock: Clock | None = None) -> None:
        self._db = SqliteWorker(path, SCHEMA)
        self._clock = clock or SystemClock()

    async def open(self) -> None:
        """Open the SQLite file, creating the schema or upgrading an older one."""
        await self._db.open()
        await self._db.write(_migrate)

    async def close(self) -> None:
        """Finish pending writes and close the file."""
        await self._db.close()

    async def append(
        self, envelopes: Sequence[Envelope], expires_at_ms: Sequence[int], limits: QueueLimits
    ) -> list[Appended]:
        """See ``MessageQueue.append``: one transaction, group-committed with other writers."""
        items = list(zip(envelopes, expires_at_ms, strict=True))

        def txn(conn: sqlite3.Connection) -> list[Appended]:
            return _append_all(conn, items, limits, self._clock.now_ms())

        return await self._db.write(txn)

    def resume_point(self, cursor: int) -> int:
        """See ``MessageQueue.resume_point``: one writer, seqs only grow, so ``cursor``."""
        return cursor

    async def read(self, device: Address, after: int, limit: int, now_ms: int) -> QueuePage:
        """See ``MessageQueue.read``."""

        def query(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT id, message_id, sender_tenant, sender_user, sender_device, content,"
                " server_ts, expires_at FROM queue"
                " WHERE tenant=? AND user=? AND device=? AND id>?"
                " ORDER BY id LIMIT ?",
                (*_key(device), after, limit + 1),
            ).fetchall()

        rows = [
            QueuedEnvelope(
                int(seq),
                Envelope(
                    message_id=bytes(mid),
                    sender=Address(str(st), str(su), int(sd)),
                    recipient=device,
                    content=bytes(content),
                    server_timestamp_ms=int(ts),
                ),
                int(exp),
            )
            for seq, mid, st, su, sd, content, ts, exp in await self._db.read(query)
        ]
        return page(rows, after, limit, now_ms)

    async def ack(self, device: Address, keys: Sequence[EnvelopeKey]) -> int:
        """See ``MessageQueue.ack``: one ``DELETE`` per chunk of keys, one depth update."""
        unique = list(dict.fromkeys(keys))

        def txn(conn: sqlite3.Connection) -> int:
            removed = 0
            freed = 0
            for chunk in _chunks(unique):
                marks = ",".join(["(?,?,?,?)"] * len(chunk))
                values = [v for k in chunk for v in (k.message_id, *_key(k.sender))]
                rows = conn.execute(
                    "DELETE FROM queue WHERE tenant=? AND user=? AND device=?"
                    " AND (message_id, sender_tenant, sender_user, sender_device) IN"
                    # a subquery, so that the whole key seeks queue_key (a bare VALUES
                    # list would scan the device's index range)
                    " (SELECT column1, column2, column3, column4"
                    f" FROM (VALUES {marks})) RETURNING size",
                    (*_key(device), *values),
                ).fetchall()
                removed += len(rows)
                freed += sum(int(r[0]) for r in rows)
            if removed:
                conn.execute(
                    "UPDATE depth SET count=count-?, bytes=bytes-?"
                    " WHERE tenant=? AND user=? AND device=?",
                    (removed, freed, *_key(device)),
                )
            return removed

        return await self._db.write(txn)

    async def purge_expired(self, now_ms: int) -> int:
        """See ``MessageQueue.purge_expired``."""

        def txn(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "DELETE FROM queue WHERE expires_at<=? RETURNING tenant, user, device, size",
                (now_ms,),
            ).fetchall()
            freed: dict[tuple[str, str, int], tuple[int, int]] = {}
            for tenant, user, device, size in rows:
                count, total = freed.get((tenant, user, device), (0, 0))
                freed[(tenant, user, device)] = (count + 1, total + int(size))
            conn.executemany(
                "UPDATE depth SET count=count-?, bytes=bytes-?"
                " WHERE tenant=? AND user=? AND device=?",
                [(c, b, *k) for k, (c, b) in freed.items()],
            )
            conn.execute("DELETE FROM accepted WHERE expires_at<=?", (now_ms,))
            return len(rows)

        return await self._db.write(txn)

    async def purge(self, device: Address) -> int:
        """See ``MessageQueue.purge``: one transaction (queue rows, dedup ids, depth)."""

        def txn(conn: sqlite3.Connection) -> int:
            where = " WHERE tenant=? AND user=? AND device=?"
            removed = conn.execute("DELETE FROM queue" + where, _key(device)).rowcount
            conn.execute("DELETE FROM accepted" + where, _key(device))
            conn.execute("DELETE FROM depth" + where, _key(device))
            return int(removed)

        return await self._db.write(txn)

    async def depth(self, device: Address) -> tuple[int, int]:
        """Envelopes and bytes waiting in ``device``'s queue (for metrics and tests)."""

        def query(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT count, bytes FROM depth WHERE tenant=? AND user=? AND device=?",
                _key(device),
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        return await self._db.read(query)


#: Most message ids (or keys, 4 variables each) bound into one ``IN (...)`` (SQLite
#: allows 32766 variables).
_IN_CHUNK = 500
_T = TypeVar("_T")
_INSERT_ROW = (
    "INSERT INTO queue (id, tenant, user, device, message_id, sender_tenant, sender_user,"
    " sender_device, content, server_ts, expires_at, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _chunks(values: list[_T]) -> list[list[_T]]:
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)]


def _accepted_keys(
    conn: sqlite3.Connection, device: Address, keys: list[EnvelopeKey]
) -> dict[Ident, int]:
    """The ``keys`` accepted for ``device`` before, and their expiry (a probe a chunk).

    A record of ``LEGACY_SENDER`` (module docstring) answers for every key of its id.
    """
    by_id: dict[bytes, list[Address]] = {}
    for k in keys:
        by_id.setdefault(k.message_id, []).append(k.sender)
    seen: dict[Ident, int] = {}
    for chunk in _chunks(list(by_id)):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT message_id, sender_tenant, sender_user, sender_device, expires_at"
            " FROM accepted WHERE tenant=? AND user=? AND device=?"
            f" AND message_id IN ({marks})",
            (*_key(device), *chunk),
        ).fetchall()
        for mid, st, su, sd, expires in rows:
            sender = Address(str(st), str(su), int(sd))
            senders = by_id[bytes(mid)] if sender == LEGACY_SENDER else [sender]
            for one in senders:
                ident = (device, one, bytes(mid))
                seen[ident] = max(int(expires), seen.get(ident, 0))
    return seen


def _last_id(conn: sqlite3.Connection) -> int:
    """The largest queue id ever handed out (AUTOINCREMENT's high-water mark)."""
    row = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='queue'), 0),"
        " coalesce((SELECT max(id) FROM queue), 0))"
    ).fetchone()
    return int(row[0])


def _append_all(
    conn: sqlite3.Connection, items: list[tuple[Envelope, int]], limits: QueueLimits, now_ms: int
) -> list[Appended]:
    """One append: facts read per recipient, decisions from ``relay.core.admission``.

    Writes are set-at-a-time. Answers come in ``items`` order, and rows are queued in
    that order.

    An id whose record has expired (not purged yet) may be stored again: its old row,
    expired and never delivered again, makes room for the new one first.
    """
    by_device: dict[Address, list[EnvelopeKey]] = {}
    for env, _ in items:
        by_device.setdefault(env.recipient, []).append(env.key)
    accepted: dict[Ident, int] = {}
    depths: dict[Address, Depth] = {}
    for device, keys in by_device.items():
        accepted.update(_accepted_keys(conn, device, list(dict.fromkeys(keys))))
        row = conn.execute(
            "SELECT count, bytes FROM depth WHERE tenant=? AND user=? AND device=?",
            _key(device),
        ).fetchone()
        depths[device] = Depth(int(row[0]), int(row[1])) if row else Depth()
    envelopes = [env for env, _ in items]
    decisions = admit(envelopes, live_ids(accepted, now_ms), depths, limits)
    stored = [
        (env, expires)
        for (env, expires), d in zip(items, decisions, strict=True)
        if d.verdict is Verdict.ADMITTED
    ]
    if not stored:
        return [d.appended() for d in decisions]
    stale = [i for i in map(ident, (env for env, _ in stored)) if i in accepted]
    for device, sender, mid in stale:  # expired records of keys stored again
        gone = conn.execute(
            "DELETE FROM queue WHERE tenant=? AND user=? AND device=? AND message_id=?"
            " AND sender_tenant=? AND sender_user=? AND sender_device=? RETURNING size",
            (*_key(device), mid, *_key(sender)),
        ).fetchall()
        conn.execute(
            "UPDATE depth SET count=count-?, bytes=bytes-? WHERE tenant=? AND user=? AND device=?",
            (len(gone), sum(int(r[0]) for r in gone), *_key(device)),
        )
    next_id = _last_id(conn) + 1
    seqs: list[int] = []
    rows: list[tuple[Any, ...]] = []
    for env, expires_at in stored:
        s = env.sender
        rows.append(
            (next_id, *_key(env.recipient), env.message_id, s.tenant, s.user, s.device,
             env.content, env.server_timestamp_ms, expires_at, env.size)
        )  # fmt: skip
        seqs.append(next_id)
        next_id += 1
    conn.executemany(_INSERT_ROW, rows)
    conn.executemany(
        "INSERT OR REPLACE INTO accepted (tenant, user, device, message_id, sender_tenant,"
        " sender_user, sender_device, expires_at) VALUES (?,?,?,?,?,?,?,?)",
        [
            (*_key(env.recipient), env.message_id, *_key(env.sender), expires)
            for env, expires in stored
        ],
    )
    conn.executemany(
        "INSERT INTO depth (tenant, user, device, count, bytes) VALUES (?,?,?,?,?)"
        " ON CONFLICT (tenant, user, device) DO UPDATE"
        " SET count=count+excluded.count, bytes=bytes+excluded.bytes",
        [(*_key(d), a.count, a.bytes) for d, a in added_depth(e for e, _ in stored).items()],
    )
    next_seq = iter(seqs)
    return [
        d.appended(next(next_seq)) if d.verdict is Verdict.ADMITTED else d.appended()
        for d in decisions
    ]
