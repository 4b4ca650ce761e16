"""The embedded MessageQueue: per-device queues in one SQLite file, fsync'd on commit.

``queue.id`` is an AUTOINCREMENT key, never reused, so it orders every device's queue
and serves as the read cursor. ``accepted`` remembers every message id until it
expires, so a retried send after an ack is still a duplicate. ``depth`` keeps count and
bytes per device so that limits cost one row lookup, not a scan.

Appends and acks are set-at-a-time: an append of N envelopes to R recipients runs about
2R + 4 statements (per recipient one ``IN (...)`` probe of ``accepted`` and one depth
read; then one ``executemany`` each for the queue rows, the accepted ids and the depth
upserts), not 5N; an ack is one ``DELETE ... IN (...) RETURNING`` and one depth update.
Queue ids are given explicitly, counting up from the largest id ever used, which is what
AUTOINCREMENT would give them: the append runs inside the writer's transaction, the only
writer, so nothing can take an id in between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.clock import Clock, SystemClock
from relay.common.sqlite_worker import SqliteWorker
from relay.core.admission import Depth, Ident, Verdict, added_depth, admit, live_ids, page
from relay.model import (
    Address,
    Appended,
    Envelope,
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
CREATE UNIQUE INDEX IF NOT EXISTS queue_message ON queue (tenant, user, device, message_id);
CREATE INDEX IF NOT EXISTS queue_expiry ON queue (expires_at);
CREATE TABLE IF NOT EXISTS accepted (
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accepted_expiry ON accepted (expires_at);
CREATE TABLE IF NOT EXISTS depth (
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
"""


def _key(a: Address) -> tuple[str, str, int]:
    return (a.tenant, a.user, a.device)


class SqliteQueue(AsyncResource):
    """MessageQueue on SQLite (see ``relay.core.ports.MessageQueue`` for the contract).

    ``clock`` (the relay's) says when an accepted id has expired, so that it may be
    stored again (``relay.core.admission.live_ids``).
    """

    def __init__(self, path: Path, *, clock: Clock | None = None) -> None:
        self._db = SqliteWorker(path, SCHEMA)
        self._clock = clock or SystemClock()

    async def open(self) -> None:
        """Open the SQLite file (creating the schema)."""
        await self._db.open()

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

    async def ack(self, device: Address, message_ids: Sequence[bytes]) -> int:
        """See ``MessageQueue.ack``."""
        ids = list(message_ids)

        def txn(conn: sqlite3.Connection) -> int:
            removed = 0
            freed = 0
            for chunk in _chunks(list(dict.fromkeys(ids))):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "DELETE FROM queue WHERE tenant=? AND user=? AND device=?"
                    f" AND message_id IN ({marks}) RETURNING size",
                    (*_key(device), *chunk),
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


#: Most message ids bound into one ``IN (...)`` (SQLite allows 32766 variables).
_IN_CHUNK = 500
_INSERT_ROW = (
    "INSERT INTO queue (id, tenant, user, device, message_id, sender_tenant, sender_user,"
    " sender_device, content, server_ts, expires_at, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _chunks(values: list[bytes]) -> list[list[bytes]]:
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)]


def _accepted_ids(
    conn: sqlite3.Connection, key: tuple[str, str, int], mids: list[bytes]
) -> dict[bytes, int]:
    """The ids among ``mids`` accepted for ``key`` before, and their expiry (a probe a chunk)."""
    seen: dict[bytes, int] = {}
    for chunk in _chunks(mids):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT message_id, expires_at FROM accepted WHERE tenant=? AND user=? AND device=?"
            f" AND message_id IN ({marks})",
            (*key, *chunk),
        ).fetchall()
        seen.update((bytes(r[0]), int(r[1])) for r in rows)
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
    by_key: dict[Address, list[bytes]] = {}
    for env, _ in items:
        by_key.setdefault(env.recipient, []).append(env.message_id)
    accepted: dict[Ident, int] = {}
    depths: dict[Address, Depth] = {}
    for device, mids in by_key.items():
        key = _key(device)
        found = _accepted_ids(conn, key, list(dict.fromkeys(mids)))
        accepted.update(((device, mid), exp) for mid, exp in found.items())
        row = conn.execute(
            "SELECT count, bytes FROM depth WHERE tenant=? AND user=? AND device=?", key
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
    stale = [(env.recipient, env.message_id) for env, _ in stored]
    stale = [i for i in stale if i in accepted]  # expired records of ids stored again
    for device, mid in stale:
        gone = conn.execute(
            "DELETE FROM queue WHERE tenant=? AND user=? AND device=? AND message_id=?"
            " RETURNING size",
            (*_key(device), mid),
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
        "INSERT OR REPLACE INTO accepted (tenant, user, device, message_id, expires_at)"
        " VALUES (?,?,?,?,?)",
        [(*_key(env.recipient), env.message_id, expires) for env, expires in stored],
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
