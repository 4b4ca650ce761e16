"""The embedded MessageQueue: per-device queues in one SQLite file, fsync'd on commit.

``queue.id`` is an AUTOINCREMENT key, never reused, so it orders every device's queue
and serves as the read cursor. ``accepted`` remembers every message id until it
expires, so a retried send after an ack is still a duplicate. ``depth`` keeps count and
bytes per device so that limits cost one row lookup, not a scan.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.model import (
    Address,
    Appended,
    Envelope,
    Outcome,
    QueuedEnvelope,
    QueueLimits,
    QueuePage,
)
from relay.resource import AsyncResource
from relay.stores.sqlite_worker import SqliteWorker

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
    """MessageQueue on SQLite (see ``relay.core.ports.MessageQueue`` for the contract)."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteWorker(path, SCHEMA)

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
            return [_append_one(conn, env, exp, limits) for env, exp in items]

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

        rows = await self._db.read(query)
        more = len(rows) > limit
        items: list[QueuedEnvelope] = []
        cursor = after
        for row in rows[:limit]:
            seq, mid, st, su, sd, content, ts, exp = row
            cursor = int(seq)
            if int(exp) <= now_ms:
                continue  # expired: skipped here, deleted by purge_expired
            env = Envelope(
                message_id=bytes(mid),
                sender=Address(str(st), str(su), int(sd)),
                recipient=device,
                content=bytes(content),
                server_timestamp_ms=int(ts),
            )
            items.append(QueuedEnvelope(cursor, env, int(exp)))
        return QueuePage(tuple(items), cursor, more)

    async def ack(self, device: Address, message_ids: Sequence[bytes]) -> int:
        """See ``MessageQueue.ack``."""
        ids = list(message_ids)

        def txn(conn: sqlite3.Connection) -> int:
            removed = 0
            freed = 0
            for mid in ids:
                row = conn.execute(
                    "DELETE FROM queue WHERE tenant=? AND user=? AND device=? AND message_id=?"
                    " RETURNING size",
                    (*_key(device), mid),
                ).fetchone()
                if row is not None:
                    removed += 1
                    freed += int(row[0])
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
            for tenant, user, device, size in rows:
                conn.execute(
                    "UPDATE depth SET count=count-1, bytes=bytes-?"
                    " WHERE tenant=? AND user=? AND device=?",
                    (size, tenant, user, device),
                )
            conn.execute("DELETE FROM accepted WHERE expires_at<=?", (now_ms,))
            return len(rows)

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


def _append_one(
    conn: sqlite3.Connection, env: Envelope, expires_at: int, limits: QueueLimits
) -> Appended:
    key = _key(env.recipient)
    seen = conn.execute(
        "SELECT 1 FROM accepted WHERE tenant=? AND user=? AND device=? AND message_id=?",
        (*key, env.message_id),
    ).fetchone()
    if seen is not None:
        return Appended(Outcome.DUPLICATE)
    row = conn.execute(
        "SELECT count, bytes FROM depth WHERE tenant=? AND user=? AND device=?", key
    ).fetchone()
    count, size = (int(row[0]), int(row[1])) if row else (0, 0)
    if count + 1 > limits.max_depth:
        return Appended(Outcome.REJECTED, limit="max_queue_depth")
    if size + env.size > limits.max_bytes:
        return Appended(Outcome.REJECTED, limit="max_queue_bytes")
    cur = conn.execute(
        "INSERT INTO queue (tenant, user, device, message_id, sender_tenant, sender_user,"
        " sender_device, content, server_ts, expires_at, size)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            *key,
            env.message_id,
            env.sender.tenant,
            env.sender.user,
            env.sender.device,
            env.content,
            env.server_timestamp_ms,
            expires_at,
            env.size,
        ),
    )
    conn.execute(
        "INSERT INTO accepted (tenant, user, device, message_id, expires_at) VALUES (?,?,?,?,?)",
        (*key, env.message_id, expires_at),
    )
    conn.execute(
        "INSERT INTO depth (tenant, user, device, count, bytes) VALUES (?,?,?,1,?)"
        " ON CONFLICT (tenant, user, device) DO UPDATE"
        " SET count=count+1, bytes=bytes+excluded.bytes",
        (*key, env.size),
    )
    return Appended(Outcome.STORED, seq=int(cur.lastrowid or 0))
