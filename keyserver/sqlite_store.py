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
    AccountState,
    BundleKeys,
    DeviceRecord,
    LinkApproval,
    NewDevice,
    OneTimePrekey,
    PendingLink,
    PqPrekey,
    PrekeysAdded,
    SignedPrekey,
)
from keyserver.ports import KeyStores
from relay.accounts import DeviceList, decode_devices, encode_devices
from relay.common.sqlite_worker import SqliteWorker
from relay.model import Address

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
CREATE TABLE IF NOT EXISTS accounts (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    account_key BLOB NOT NULL,
    list_version INTEGER NOT NULL,
    list_timestamp_ms INTEGER NOT NULL,
    list_devices BLOB NOT NULL,
    list_signature BLOB NOT NULL,
    PRIMARY KEY (tenant, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS link_requests (
    request_id BLOB PRIMARY KEY,
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    identity_key BLOB NOT NULL,
    identity_dh_key BLOB NOT NULL,
    identity_dh_signature BLOB NOT NULL,
    signed_prekey_id INTEGER NOT NULL,
    signed_prekey BLOB NOT NULL,
    signed_prekey_signature BLOB NOT NULL,
    pq_prekey_id INTEGER NOT NULL,
    pq_prekey BLOB NOT NULL,
    pq_prekey_signature BLOB NOT NULL,
    link_key BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    approved_device INTEGER,
    sealed_account BLOB,
    approved_list_version INTEGER,
    approved_list_timestamp_ms INTEGER,
    approved_list_devices BLOB,
    approved_list_signature BLOB,
    approved_account_key BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS link_requests_by_user ON link_requests (tenant, user, created_at_ms);
CREATE INDEX IF NOT EXISTS link_requests_by_expiry ON link_requests (expires_at_ms);
CREATE TABLE IF NOT EXISTS once_only (
    kind TEXT NOT NULL,
    digest BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS once_only_by_expiry ON once_only (expires_at_ms);
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
            existing = _find_identity(conn, tenant, user, identity_key)
            if existing is not None:
                return existing
            device = NewDevice(
                identity_key, identity_dh_key, identity_dh_signature, registered_at_ms
            )
            return _insert_device(conn, tenant, user, _last_device(conn, tenant, user) + 1, device)

        return await self._worker.write(txn)

    async def find_identity(
        self, tenant: str, user: str, identity_key: bytes
    ) -> DeviceRecord | None:
        """The device ever registered with ``identity_key`` (removed or not), or None."""
        return await self._worker.read(
            lambda conn: _find_identity(conn, tenant, user, identity_key)
        )

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
        return await self._worker.write(lambda conn: _remove(conn, address, removed_at_ms))


def _find_identity(
    conn: sqlite3.Connection, tenant: str, user: str, identity_key: bytes
) -> DeviceRecord | None:
    row = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM {_FROM_DEVICES}"
        " WHERE d.tenant = ? AND d.user = ? AND d.identity_key = ?",
        (tenant, user, identity_key),
    ).fetchone()
    return None if row is None else _record(row)


def _last_device(conn: sqlite3.Connection, tenant: str, user: str) -> int:
    # Removed devices keep their rows, so their numbers are never given out again.
    (number,) = conn.execute(
        "SELECT COALESCE(MAX(device), 0) FROM devices WHERE tenant = ? AND user = ?",
        (tenant, user),
    ).fetchone()
    return int(number)


def _insert_device(
    conn: sqlite3.Connection, tenant: str, user: str, number: int, device: NewDevice
) -> DeviceRecord:
    row = (
        tenant,
        user,
        number,
        device.identity_key,
        device.identity_dh_key,
        device.identity_dh_signature,
        device.registered_at_ms,
    )
    conn.execute(f"INSERT INTO devices ({_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
    return _record(row)


def _remove(conn: sqlite3.Connection, address: Address, removed_at_ms: int) -> bool:
    found = conn.execute(f"SELECT 1 FROM devices WHERE {_WHERE_DEVICE}", _key(address))
    if found.fetchone() is None:
        return False
    cur = conn.execute(
        "INSERT OR IGNORE INTO removed_devices (tenant, user, device, removed_at_ms)"
        " VALUES (?, ?, ?, ?)",
        (*_key(address), removed_at_ms),
    )
    return cur.rowcount == 1


def _list_row(device_list: DeviceList) -> tuple[object, ...]:
    return (
        device_list.account_key,
        device_list.version,
        device_list.timestamp_ms,
        encode_devices(device_list.devices),
        device_list.signature,
    )


def _list_from(tenant: str, user: str, row: Sequence[Any]) -> DeviceList:
    key, version, ts, devices, signature = row
    return DeviceList(
        tenant,
        user,
        int(version),
        int(ts),
        decode_devices(bytes(devices)),
        bytes(key),
        bytes(signature),
    )


def _account(conn: sqlite3.Connection, tenant: str, user: str) -> AccountState:
    row = conn.execute(
        "SELECT account_key, list_version, list_timestamp_ms, list_devices, list_signature"
        " FROM accounts WHERE tenant = ? AND user = ?",
        (tenant, user),
    ).fetchone()
    last = _last_device(conn, tenant, user)
    if row is None:
        return AccountState(None, None, last)
    return AccountState(bytes(row[0]), _list_from(tenant, user, row), last)


def _new_number(device_list: DeviceList, old: DeviceList | None) -> int | None:
    """The one device number ``device_list`` adds to ``old`` (None if not exactly one)."""
    before = set(old.numbers()) if old is not None else set()
    added = [n for n in device_list.numbers() if n not in before]
    return added[0] if len(added) == 1 else None


class SqliteAccountDirectory:
    """AccountDirectory on the ``accounts`` and ``devices`` tables: one transaction a change."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def account(self, tenant: str, user: str) -> AccountState:
        """The user's account key, latest list and highest device number ever used."""
        return await self._worker.read(lambda conn: _account(conn, tenant, user))

    async def create(
        self, device_list: DeviceList, device: NewDevice, *, replaces: int | None = None
    ) -> bool:
        """Create (or, with ``replaces``, reset) the account; see AccountDirectory."""
        tenant, user = device_list.tenant, device_list.user

        def txn(conn: sqlite3.Connection) -> bool:
            state = _account(conn, tenant, user)
            if replaces is None and state.exists:
                return False
            if replaces is not None and (
                state.device_list is None or state.device_list.version != replaces
            ):
                return False
            if device_list.numbers() != (state.last_device + 1,):
                return False
            if _find_identity(conn, tenant, user, device.identity_key) is not None:
                return False
            if state.device_list is not None:
                for number in state.device_list.numbers():
                    _remove(conn, Address(tenant, user, number), device.registered_at_ms)
            _insert_device(conn, tenant, user, state.last_device + 1, device)
            conn.execute(
                "INSERT OR REPLACE INTO accounts (tenant, user, account_key, list_version,"
                " list_timestamp_ms, list_devices, list_signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tenant, user, *_list_row(device_list)),
            )
            return True

        return await self._worker.write(txn)

    async def add_device(
        self, device_list: DeviceList, device: NewDevice, *, expected: int
    ) -> bool:
        """Store the list and register its new device if the version is still ``expected``."""
        tenant, user = device_list.tenant, device_list.user

        def txn(conn: sqlite3.Connection) -> bool:
            state = _account(conn, tenant, user)
            if state.device_list is None or state.device_list.version != expected:
                return False
            number = _new_number(device_list, state.device_list)
            if number != state.last_device + 1:
                return False
            if _find_identity(conn, tenant, user, device.identity_key) is not None:
                return False
            _insert_device(conn, tenant, user, number, device)
            _store_list(conn, device_list)
            return True

        return await self._worker.write(txn)

    async def remove_devices(
        self, device_list: DeviceList, removed: Sequence[int], removed_at_ms: int, *, expected: int
    ) -> bool:
        """Store the list and mark ``removed`` removed if the version is still ``expected``."""
        tenant, user = device_list.tenant, device_list.user

        def txn(conn: sqlite3.Connection) -> bool:
            state = _account(conn, tenant, user)
            if state.device_list is None or state.device_list.version != expected:
                return False
            for number in removed:
                _remove(conn, Address(tenant, user, number), removed_at_ms)
            _store_list(conn, device_list)
            return True

        return await self._worker.write(txn)


def _store_list(conn: sqlite3.Connection, device_list: DeviceList) -> None:
    conn.execute(
        "UPDATE accounts SET account_key = ?, list_version = ?, list_timestamp_ms = ?,"
        " list_devices = ?, list_signature = ? WHERE tenant = ? AND user = ?",
        (*_list_row(device_list), device_list.tenant, device_list.user),
    )


_LINK_COLUMNS = (
    "request_id, tenant, user, identity_key, identity_dh_key, identity_dh_signature,"
    " signed_prekey_id, signed_prekey, signed_prekey_signature, pq_prekey_id, pq_prekey,"
    " pq_prekey_signature, link_key, created_at_ms, expires_at_ms, approved_device,"
    " sealed_account, approved_list_version, approved_list_timestamp_ms,"
    " approved_list_devices, approved_list_signature, approved_account_key"
)


def _link(row: Sequence[Any]) -> PendingLink:
    tenant, user = row[1], row[2]
    approval = None
    if row[15] is not None:
        listed = _list_from(tenant, user, (row[21], row[17], row[18], row[19], row[20]))
        approval = LinkApproval(int(row[15]), bytes(row[16]), listed)
    return PendingLink(
        request_id=bytes(row[0]),
        tenant=tenant,
        user=user,
        identity_key=bytes(row[3]),
        identity_dh_key=bytes(row[4]),
        identity_dh_signature=bytes(row[5]),
        signed_prekey=SignedPrekey(int(row[6]), bytes(row[7]), bytes(row[8])),
        last_resort_pq_prekey=PqPrekey(int(row[9]), bytes(row[10]), bytes(row[11])),
        link_key=bytes(row[12]),
        created_at_ms=int(row[13]),
        expires_at_ms=int(row[14]),
        approval=approval,
    )


class SqliteLinkRequests:
    """LinkRequests on the ``link_requests`` table (expired rows are deleted as new come)."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def add(self, link: PendingLink, max_pending: int, now_ms: int) -> bool:
        """Store ``link`` unless its user has ``max_pending`` pending requests already."""

        def txn(conn: sqlite3.Connection) -> bool:
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM link_requests WHERE tenant = ? AND user = ?"
                " AND approved_device IS NULL AND expires_at_ms > ?",
                (link.tenant, link.user, now_ms),
            ).fetchone()
            if pending >= max_pending:
                return False  # refused: nothing written, not even the clean-up below
            conn.execute("DELETE FROM link_requests WHERE expires_at_ms <= ?", (now_ms,))
            spk, pq = link.signed_prekey, link.last_resort_pq_prekey
            conn.execute(
                "INSERT INTO link_requests (request_id, tenant, user, identity_key,"
                " identity_dh_key, identity_dh_signature, signed_prekey_id, signed_prekey,"
                " signed_prekey_signature, pq_prekey_id, pq_prekey, pq_prekey_signature,"
                " link_key, created_at_ms, expires_at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *(link.request_id, link.tenant, link.user, link.identity_key),
                    *(link.identity_dh_key, link.identity_dh_signature),
                    *(spk.key_id, spk.public_key, spk.signature),
                    *(pq.key_id, pq.public_key, pq.signature),
                    *(link.link_key, link.created_at_ms, link.expires_at_ms),
                ),
            )
            return True

        return await self._worker.write(txn)

    async def pending(self, tenant: str, user: str, now_ms: int) -> tuple[PendingLink, ...]:
        """The user's unexpired, unapproved requests, oldest first."""

        def query(conn: sqlite3.Connection) -> tuple[PendingLink, ...]:
            rows = conn.execute(
                f"SELECT {_LINK_COLUMNS} FROM link_requests WHERE tenant = ? AND user = ?"
                " AND approved_device IS NULL AND expires_at_ms > ? ORDER BY created_at_ms",
                (tenant, user, now_ms),
            ).fetchall()
            return tuple(_link(r) for r in rows)

        return await self._worker.read(query)

    async def get(self, request_id: bytes, now_ms: int) -> PendingLink | None:
        """The request (approved or not), or None if unknown or expired."""

        def query(conn: sqlite3.Connection) -> PendingLink | None:
            row = conn.execute(
                f"SELECT {_LINK_COLUMNS} FROM link_requests"
                " WHERE request_id = ? AND expires_at_ms > ?",
                (request_id, now_ms),
            ).fetchone()
            return None if row is None else _link(row)

        return await self._worker.read(query)

    async def approve(self, request_id: bytes, approval: LinkApproval, now_ms: int) -> bool:
        """Record ``approval`` once; False if the request is gone or approved already."""
        listed = approval.device_list

        def txn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE link_requests SET approved_device = ?, sealed_account = ?,"
                " approved_account_key = ?, approved_list_version = ?,"
                " approved_list_timestamp_ms = ?, approved_list_devices = ?,"
                " approved_list_signature = ?"
                " WHERE request_id = ? AND approved_device IS NULL AND expires_at_ms > ?",
                (
                    approval.device,
                    approval.sealed_account,
                    *_list_row(listed),
                    request_id,
                    now_ms,
                ),
            )
            return cur.rowcount == 1

        return await self._worker.write(txn)


class SqliteOnceOnly:
    """OnceOnly on the ``once_only`` table; expired entries are deleted as new come."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def first_use(self, kind: str, digest: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """True the first time ``(kind, digest)`` is seen before it expires."""

        def txn(conn: sqlite3.Connection) -> bool:
            conn.execute(  # an expired entry of the same digest may be used again
                "DELETE FROM once_only WHERE kind = ? AND digest = ? AND expires_at_ms <= ?",
                (kind, digest, now_ms),
            )
            cur = conn.execute(
                "INSERT OR IGNORE INTO once_only (kind, digest, expires_at_ms) VALUES (?, ?, ?)",
                (kind, digest, expires_at_ms),
            )
            if cur.rowcount == 1:
                conn.execute(
                    "DELETE FROM once_only WHERE (kind, digest) IN (SELECT kind, digest"
                    " FROM once_only WHERE expires_at_ms <= ? ORDER BY expires_at_ms LIMIT 16)",
                    (now_ms,),
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
        accounts=SqliteAccountDirectory(worker),
        links=SqliteLinkRequests(worker),
        once=SqliteOnceOnly(worker),
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
