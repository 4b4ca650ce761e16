"""The embedded key store: every protocol of ``keyserver.ports`` on one SQLite file.

The file is ``keys.db`` in the data directory. Every write runs on the SqliteWorker's
single writer thread inside one transaction, so a read-then-write inside one ``write``
call is atomic: that is what makes device numbering, one-time prekey claims and the
handout of a whole bundle safe under any concurrency in this process. A second process
on the same file is serialised by SQLite's write lock (BEGIN IMMEDIATE).

A claimed one-time prekey leaves a tombstone row (key_id kept, public key erased) so
that a retried publish can never put a claimed key back into the pool. A removed device
keeps its ``devices`` row (so its number and identity key stay taken) and gets a row in
``removed_devices``; the tables of files made by earlier releases are all still used
as they were (new tables only, no column added).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from keyserver.model import (
    BundleKeys,
    DeviceRecord,
    OneTimePrekey,
    PqPrekey,
    PrekeysAdded,
    SignedPrekey,
)
from keyserver.ports import KeyStores
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
CREATE TABLE IF NOT EXISTS removed_devices (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    removed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_resort_pq_prekeys (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_pq_prekeys (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public_key BLOB,
    signature BLOB,
    claimed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, user, device, key_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS one_time_pq_prekeys_unclaimed
    ON one_time_pq_prekeys (tenant, user, device, key_id) WHERE claimed = 0;
"""

_DEVICE_COLUMNS = (
    "d.tenant, d.user, d.device, d.identity_key, d.identity_dh_key, d.identity_dh_signature,"
    " d.registered_at_ms, r.removed_at_ms"
)
_FROM_DEVICES = (
    "devices d LEFT JOIN removed_devices r"
    " ON r.tenant = d.tenant AND r.user = d.user AND r.device = d.device"
)
_INSERT_COLUMNS = (
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
        removed_at_ms=row[7] if len(row) > 7 else None,
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
                f"SELECT {_DEVICE_COLUMNS} FROM {_FROM_DEVICES}"
                " WHERE d.tenant = ? AND d.user = ? AND d.identity_key = ?",
                (tenant, user, identity_key),
            ).fetchone()
            if existing is not None:
                return _record(existing)
            # Removed devices keep their rows, so their numbers are never given out again.
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
                f"INSERT INTO devices ({_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row
            )
            return _record(row)

        return await self._worker.write(txn)

    async def get(self, address: Address) -> DeviceRecord | None:
        """Return the record of the device at ``address``; None if none or removed."""

        def query(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM {_FROM_DEVICES}"
                " WHERE d.tenant = ? AND d.user = ? AND d.device = ? AND r.device IS NULL",
                _key(address),
            ).fetchone()
            return None if row is None else _record(row)

        return await self._worker.read(query)

    async def list(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return the devices of (tenant, user) not removed, in ascending device number."""

        def query(conn: sqlite3.Connection) -> tuple[DeviceRecord, ...]:
            rows = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM {_FROM_DEVICES}"
                " WHERE d.tenant = ? AND d.user = ? AND r.device IS NULL ORDER BY d.device",
                (tenant, user),
            ).fetchall()
            return tuple(_record(row) for row in rows)

        return await self._worker.read(query)

    async def remove(self, address: Address, removed_at_ms: int) -> bool:
        """Mark the device removed (a ``removed_devices`` row); False if none or removed."""

        def txn(conn: sqlite3.Connection) -> bool:
            found = conn.execute(f"SELECT 1 FROM devices WHERE {_WHERE_DEVICE}", _key(address))
            if found.fetchone() is None:
                return False
            cur = conn.execute(
                "INSERT OR IGNORE INTO removed_devices (tenant, user, device, removed_at_ms)"
                " VALUES (?, ?, ?, ?)",
                (*_key(address), removed_at_ms),
            )
            return cur.rowcount == 1

        return await self._worker.write(txn)


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
        return await self._worker.read(lambda conn: _signed(conn, device))

    async def add_one_time_prekeys(
        self, device: Address, prekeys: Sequence[OneTimePrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` idempotently by key_id, all or nothing within ``max_held``."""
        rows = [(p.key_id, p.public_key) for p in prekeys]
        return await self._worker.write(lambda conn: _EC_POOL.add(conn, device, rows, max_held))

    async def claim_one_time_prekey(self, device: Address) -> OneTimePrekey | None:
        """Claim the unclaimed key with the lowest key_id (one write transaction)."""
        return await self._worker.write(lambda conn: _claim_ec(conn, device))

    async def count_one_time_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` holds."""
        return await self._worker.read(lambda conn: _EC_POOL.count(conn, device))


class SqlitePqPrekeyStore:
    """PqPrekeyStore on ``last_resort_pq_prekeys`` and ``one_time_pq_prekeys``."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def set_last_resort_pq_prekey(self, device: Address, prekey: PqPrekey) -> None:
        """Store ``prekey`` as the last-resort PQ prekey of ``device``, replacing any other."""

        def txn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO last_resort_pq_prekeys"
                " (tenant, user, device, key_id, public_key, signature) VALUES (?, ?, ?, ?, ?, ?)",
                (*_key(device), prekey.key_id, prekey.public_key, prekey.signature),
            )

        await self._worker.write(txn)

    async def last_resort_pq_prekey(self, device: Address) -> PqPrekey | None:
        """Return the last-resort PQ prekey of ``device``, or None."""
        return await self._worker.read(lambda conn: _last_resort(conn, device))

    async def add_one_time_pq_prekeys(
        self, device: Address, prekeys: Sequence[PqPrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` idempotently by key_id, all or nothing within ``max_held``."""
        rows = [(p.key_id, p.public_key, p.signature) for p in prekeys]
        return await self._worker.write(lambda conn: _PQ_POOL.add(conn, device, rows, max_held))

    async def claim_one_time_pq_prekey(self, device: Address) -> PqPrekey | None:
        """Claim the unclaimed PQ key with the lowest key_id (one write transaction)."""
        return await self._worker.write(lambda conn: _claim_pq(conn, device))

    async def count_one_time_pq_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time PQ prekeys ``device`` holds."""
        return await self._worker.read(lambda conn: _PQ_POOL.count(conn, device))


class SqlitePrekeyHandout:
    """PrekeyHandout: reads and claims all of one bundle's keys in one write transaction."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def claim_bundle_keys(self, device: Address) -> BundleKeys:
        """Signed prekeys and one one-time key of each pool; see PrekeyHandout."""

        def txn(conn: sqlite3.Connection) -> BundleKeys:
            signed = _signed(conn, device)
            last_resort = _last_resort(conn, device)
            if signed is None:
                return BundleKeys(None, None, last_resort, last_resort is not None)
            pq = _claim_pq(conn, device)
            if pq is None and last_resort is None:
                return BundleKeys(signed, None, None, False)
            one_time = _claim_ec(conn, device)
            if pq is None:
                return BundleKeys(signed, one_time, last_resort, True)
            return BundleKeys(signed, one_time, pq, False)

        return await self._worker.write(txn)


def sqlite_key_stores(worker: SqliteWorker) -> KeyStores:
    """Every key directory store on the SQLite file of ``worker`` (opened with SCHEMA)."""
    return KeyStores(
        devices=SqliteDeviceDirectory(worker),
        prekeys=SqlitePrekeyStore(worker),
        pq_prekeys=SqlitePqPrekeyStore(worker),
        handout=SqlitePrekeyHandout(worker),
    )


class _Pool:
    """A table of one-time keys: ``key_id`` then ``columns``, claims leave tombstones."""

    def __init__(self, table: str, columns: tuple[str, ...]) -> None:
        self.table = table
        self.columns = columns

    def add(
        self,
        conn: sqlite3.Connection,
        device: Address,
        rows: Sequence[tuple[object, ...]],
        max_held: int,
    ) -> PrekeysAdded:
        names = ", ".join(("tenant", "user", "device", "key_id", *self.columns))
        marks = ", ".join("?" * (4 + len(self.columns)))
        conn.execute("SAVEPOINT add_prekeys")
        before = conn.total_changes
        conn.executemany(
            f"INSERT OR IGNORE INTO {self.table} ({names}) VALUES ({marks})",
            [(*_key(device), *row) for row in rows],
        )
        added = conn.total_changes - before
        held = self.count(conn, device)
        if held > max_held:
            conn.execute("ROLLBACK TO add_prekeys")
            conn.execute("RELEASE add_prekeys")
            return PrekeysAdded(held=held - added, accepted=False)
        conn.execute("RELEASE add_prekeys")
        return PrekeysAdded(held=held, accepted=True)

    def claim(self, conn: sqlite3.Connection, device: Address) -> tuple[Any, ...] | None:
        row = conn.execute(
            f"SELECT key_id, {', '.join(self.columns)} FROM {self.table}"
            f" WHERE {_WHERE_DEVICE} AND claimed = 0 ORDER BY key_id LIMIT 1",
            _key(device),
        ).fetchone()
        if row is None:
            return None
        erase = ", ".join(f"{c} = NULL" for c in self.columns)
        conn.execute(
            f"UPDATE {self.table} SET claimed = 1, {erase} WHERE {_WHERE_DEVICE} AND key_id = ?",
            (*_key(device), row[0]),
        )
        return tuple(row)

    def count(self, conn: sqlite3.Connection, device: Address) -> int:
        (count,) = conn.execute(
            f"SELECT COUNT(*) FROM {self.table} WHERE {_WHERE_DEVICE} AND claimed = 0",
            _key(device),
        ).fetchone()
        return int(count)


_EC_POOL = _Pool("one_time_prekeys", ("public_key",))
_PQ_POOL = _Pool("one_time_pq_prekeys", ("public_key", "signature"))


def _claim_ec(conn: sqlite3.Connection, device: Address) -> OneTimePrekey | None:
    row = _EC_POOL.claim(conn, device)
    return None if row is None else OneTimePrekey(int(row[0]), bytes(row[1]))


def _claim_pq(conn: sqlite3.Connection, device: Address) -> PqPrekey | None:
    row = _PQ_POOL.claim(conn, device)
    return None if row is None else PqPrekey(int(row[0]), bytes(row[1]), bytes(row[2]))


def _signed(conn: sqlite3.Connection, device: Address) -> SignedPrekey | None:
    row = conn.execute(
        f"SELECT key_id, public_key, signature FROM signed_prekeys WHERE {_WHERE_DEVICE}",
        _key(device),
    ).fetchone()
    return None if row is None else SignedPrekey(row[0], bytes(row[1]), bytes(row[2]))


def _last_resort(conn: sqlite3.Connection, device: Address) -> PqPrekey | None:
    row = conn.execute(
        f"SELECT key_id, public_key, signature FROM last_resort_pq_prekeys WHERE {_WHERE_DEVICE}",
        _key(device),
    ).fetchone()
    return None if row is None else PqPrekey(row[0], bytes(row[1]), bytes(row[2]))
