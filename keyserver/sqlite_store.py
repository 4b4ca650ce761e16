"""The embedded key store: both storage protocols on one SQLite file (``keys.db``).

Every write runs on the SqliteWorker's single writer thread inside one transaction, so
a read-then-write inside one ``write`` call is atomic: that is what makes device
numbering and one-time prekey claims safe under any concurrency in this process. A
second process on the same file is serialised by SQLite's write lock (BEGIN IMMEDIATE).

A claimed one-time prekey leaves a tombstone row (key_id kept, public key erased) so
that a retried publish can never put a claimed key back into the pool.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from keyserver.model import DeviceRecord, OneTimePrekey, PrekeysAdded, SignedPrekey
from relay.model import Address
from relay.stores.sqlite_worker import SqliteWorker

#: File name of the embedded key store inside ``storage.data_dir``.
KEYS_DB = "keys.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    identity_key BLOB NOT NULL,
    identity_dh_key BLOB NOT NULL,
    identity_dh_signature BLOB NOT NULL,
    registered_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS devices_by_identity_key
    ON devices (tenant, user, identity_key);
CREATE TABLE IF NOT EXISTS signed_prekeys (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public_key BLOB,
    claimed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, user, device, key_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS one_time_prekeys_unclaimed
    ON one_time_prekeys (tenant, user, device, key_id) WHERE claimed = 0;
"""

_DEVICE_COLUMNS = (
    "tenant, user, device, identity_key, identity_dh_key, identity_dh_signature, registered_at_ms"
)
_WHERE_DEVICE = "tenant = ? AND user = ? AND device = ?"


def _key(device: Address) -> tuple[str, str, int]:
    return (device.tenant, device.user, device.device)


def _record(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        address=Address(row[0], row[1], row[2]),
        identity_key=bytes(row[3]),
        identity_dh_key=bytes(row[4]),
        identity_dh_signature=bytes(row[5]),
        registered_at_ms=row[6],
    )


class SqliteDeviceDirectory:
    """DeviceDirectory on the ``devices`` table of a SqliteWorker."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def register(
        self,
        tenant: str,
        user: str,
        *,
        identity_key: bytes,
        identity_dh_key: bytes,
        identity_dh_signature: bytes,
        registered_at_ms: int,
    ) -> DeviceRecord:
        """Register a device under the next number of (tenant, user); see DeviceDirectory."""

        def txn(conn: sqlite3.Connection) -> DeviceRecord:
            existing = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices"
                " WHERE tenant = ? AND user = ? AND identity_key = ?",
                (tenant, user, identity_key),
            ).fetchone()
            if existing is not None:
                return _record(existing)
            (number,) = conn.execute(
                "SELECT COALESCE(MAX(device), 0) + 1 FROM devices WHERE tenant = ? AND user = ?",
                (tenant, user),
            ).fetchone()
            row = (
                tenant,
                user,
                number,
                identity_key,
                identity_dh_key,
                identity_dh_signature,
                registered_at_ms,
            )
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row
            )
            return _record(row)

        return await self._worker.write(txn)

    async def get(self, address: Address) -> DeviceRecord | None:
        """Return the record of the device at ``address``, or None."""

        def query(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE {_WHERE_DEVICE}", _key(address)
            ).fetchone()
            return None if row is None else _record(row)

        return await self._worker.read(query)

    async def list(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return the devices of (tenant, user) in ascending device number."""

        def query(conn: sqlite3.Connection) -> tuple[DeviceRecord, ...]:
            rows = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant = ? AND user = ?"
                " ORDER BY device",
                (tenant, user),
            ).fetchall()
            return tuple(_record(row) for row in rows)

        return await self._worker.read(query)


class SqlitePrekeyStore:
    """PrekeyStore on the ``signed_prekeys`` and ``one_time_prekeys`` tables."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def set_signed_prekey(self, device: Address, prekey: SignedPrekey) -> None:
        """Store ``prekey`` as the signed prekey of ``device``, replacing any previous one."""

        def txn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO signed_prekeys"
                " (tenant, user, device, key_id, public_key, signature) VALUES (?, ?, ?, ?, ?, ?)",
                (*_key(device), prekey.key_id, prekey.public_key, prekey.signature),
            )

        await self._worker.write(txn)

    async def signed_prekey(self, device: Address) -> SignedPrekey | None:
        """Return the current signed prekey of ``device``, or None."""

        def query(conn: sqlite3.Connection) -> SignedPrekey | None:
            row = conn.execute(
                f"SELECT key_id, public_key, signature FROM signed_prekeys WHERE {_WHERE_DEVICE}",
                _key(device),
            ).fetchone()
            return None if row is None else SignedPrekey(row[0], bytes(row[1]), bytes(row[2]))

        return await self._worker.read(query)

    async def add_one_time_prekeys(
        self, device: Address, prekeys: Sequence[OneTimePrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` idempotently by key_id, all or nothing within ``max_held``."""
        rows = [(*_key(device), p.key_id, p.public_key) for p in prekeys]

        def txn(conn: sqlite3.Connection) -> PrekeysAdded:
            conn.execute("SAVEPOINT add_prekeys")
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO one_time_prekeys"
                " (tenant, user, device, key_id, public_key) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            added = conn.total_changes - before
            held = _count(conn, device)
            if held > max_held:
                conn.execute("ROLLBACK TO add_prekeys")
                conn.execute("RELEASE add_prekeys")
                return PrekeysAdded(held=held - added, accepted=False)
            conn.execute("RELEASE add_prekeys")
            return PrekeysAdded(held=held, accepted=True)

        return await self._worker.write(txn)

    async def claim_one_time_prekey(self, device: Address) -> OneTimePrekey | None:
        """Claim the unclaimed key with the lowest key_id (one write transaction)."""

        def txn(conn: sqlite3.Connection) -> OneTimePrekey | None:
            row = conn.execute(
                f"SELECT key_id, public_key FROM one_time_prekeys WHERE {_WHERE_DEVICE}"
                " AND claimed = 0 ORDER BY key_id LIMIT 1",
                _key(device),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE one_time_prekeys SET claimed = 1, public_key = NULL"
                f" WHERE {_WHERE_DEVICE} AND key_id = ?",
                (*_key(device), row[0]),
            )
            return OneTimePrekey(row[0], bytes(row[1]))

        return await self._worker.write(txn)

    async def count_one_time_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` holds."""
        return await self._worker.read(lambda conn: _count(conn, device))


def _count(conn: sqlite3.Connection, device: Address) -> int:
    (count,) = conn.execute(
        f"SELECT COUNT(*) FROM one_time_prekeys WHERE {_WHERE_DEVICE} AND claimed = 0",
        _key(device),
    ).fetchone()
    return int(count)
