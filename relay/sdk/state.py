"""The device's local state: one SQLite file ``<home>/device.db``, mode 0600.

It holds the identity keys, the device address once registered, the user's account key
(the private half: every linked device holds it), the account keys and device lists of
peer users as first seen or last trusted (trust on first use), a link request waiting
for approval, the private parts of the prekeys, the ids of received messages (for
exactly-once delivery to the application, kept 31 days: longer than any envelope
lives on the relay) and the local inbox of messages the application has not
acknowledged yet.

Methods are synchronous and quick; every write commits (fsync'd) before it returns.
:class:`~relay.sdk.client.RelayClient` runs them off the event loop. The object may be
used from several threads (a lock serialises access). Never log keys or contents.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from relay.accounts import ListedDevice, decode_devices, encode_devices
from relay.authproof import parse_address
from relay.clock import Clock, SystemClock
from relay.model import Address
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.keys import Identity, Prekey

DB_NAME = "device.db"
#: Received message ids are remembered this long (the relay's TTL cap is 30 days).
DEDUP_RETENTION_MS = 31 * 24 * 3600 * 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    signing_private BLOB NOT NULL,
    dh_private BLOB NOT NULL,
    tenant TEXT, user TEXT, device INTEGER
);
CREATE TABLE IF NOT EXISTS prekeys (
    key_id INTEGER PRIMARY KEY,
    signed INTEGER NOT NULL,
    private BLOB NOT NULL,
    public BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS device_prekeys (
    key_id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('signed', 'last_resort', 'one_time_ec', 'one_time_pq')),
    private BLOB NOT NULL,
    unpublished INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS device_prekey_counter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS received (
    sender TEXT NOT NULL,
    message_id BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS received_by_time ON received (received_ms);
CREATE TABLE IF NOT EXISTS sessions (
    peer TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    record BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (tenant, user);
CREATE TABLE IF NOT EXISTS account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    account_private BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_accounts (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    account_key BLOB NOT NULL,
    version INTEGER NOT NULL,
    devices BLOB NOT NULL,
    pinned_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, user)
);
CREATE TABLE IF NOT EXISTS pending_link (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    request_id BLOB NOT NULL,
    link_private BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    message_id BLOB NOT NULL,
    content BLOB NOT NULL,
    server_timestamp_ms INTEGER NOT NULL,
    UNIQUE (sender, message_id)
);
"""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message as the application sees it: ``content`` is already opened by the codec."""

    sender: Address
    message_id: bytes
    content: bytes
    server_timestamp_ms: int


@dataclass(frozen=True, slots=True)
class PinnedAccount:
    """A peer user's account key and device list, as this device last accepted them."""

    account_key: bytes
    version: int
    devices: tuple[ListedDevice, ...]
    pinned_ms: int


@dataclass(frozen=True, slots=True)
class PendingLinkState:
    """A link request this device made and waits on (the private link key with it)."""

    tenant: str
    user: str
    request_id: bytes
    link_private: bytes = field(repr=False)
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """A message in the local inbox; ``seq`` orders the inbox (arrival order)."""

    seq: int
    message: ReceivedMessage


class DeviceState:
    """The state file of one device. Open with :meth:`open`; close (or use ``with``)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, clock: Clock) -> None:
        self.path = path
        self._conn = conn
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0

    @classmethod
    def open(cls, home: Path | str, *, clock: Clock | None = None) -> DeviceState:
        """Open (creating if needed) ``<home>/device.db``; a new home is made with mode 0700."""
        home = Path(home).expanduser()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = home / DB_NAME
        # Create the file ourselves so that it is 0600 from its first byte (SQLite gives
        # its -wal and -shm files the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.executescript(_SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        return cls(path, conn, clock or SystemClock())

    @staticmethod
    def exists(home: Path | str) -> bool:
        """Whether ``home`` already holds a state file."""
        return (Path(home).expanduser() / DB_NAME).exists()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> DeviceState:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction; writes of this object inside it join it (reentrant).

        Used to commit a decrypted message and the session state that decrypted it
        together, so a crash can neither lose the message nor reuse a message key.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self._conn.execute("COMMIT")

    _txn = transaction

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, args))

    # -- identity ---------------------------------------------------------------------

    def save_identity(self, identity: Identity, prekeys: Sequence[Prekey] = ()) -> None:
        """Store the identity keys with its first prekeys, in one transaction.

        Raises FileExistsError if the state already has an identity.
        """
        signing, dh = identity.private_bytes()
        with self._txn() as conn:
            if conn.execute("SELECT 1 FROM identity").fetchone():
                raise FileExistsError(f"{self.path} already holds an identity")
            conn.execute(
                "INSERT INTO identity (id, signing_private, dh_private) VALUES (1, ?, ?)",
                (signing, dh),
            )
            self._insert_prekeys(conn, prekeys)

    def identity(self) -> Identity | None:
        """The identity keys, or None before :meth:`save_identity`."""
        rows = self._query("SELECT signing_private, dh_private FROM identity")
        if not rows:
            return None
        signing, dh = rows[0]
        assert isinstance(signing, bytes) and isinstance(dh, bytes)
        return Identity.from_private_bytes(signing, dh)

    def save_address(self, address: Address) -> None:
        """Record the address the key directory assigned to this device."""
        with self._txn() as conn:
            cur = conn.execute(
                "UPDATE identity SET tenant = ?, user = ?, device = ?",
                (address.tenant, address.user, address.device),
            )
            if cur.rowcount != 1:
                raise LookupError(f"{self.path} has no identity to give an address")

    def address(self) -> Address | None:
        """This device's address, or None until it is registered."""
        rows = self._query("SELECT tenant, user, device FROM identity WHERE device IS NOT NULL")
        if not rows:
            return None
        tenant, user, device = rows[0]
        return Address(str(tenant), str(user), int(str(device)))

    # -- accounts -------------------------------------------------------------------------

    def save_account_key(self, private: bytes) -> None:
        """Store (or replace) the private account key of this device's user."""
        with self._txn() as conn:
            conn.execute(
                "INSERT INTO account (id, account_private) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET account_private = excluded.account_private",
                (private,),
            )

    def account_key(self) -> bytes | None:
        """The private account key (32 raw bytes), or None before one is made or linked."""
        rows = self._query("SELECT account_private FROM account")
        if not rows:
            return None
        value = rows[0][0]
        assert isinstance(value, bytes)
        return value

    def pinned_account(self, tenant: str, user: str) -> PinnedAccount | None:
        """The account key and device list of ``user`` as this device last accepted them."""
        rows = self._query(
            "SELECT account_key, version, devices, pinned_ms FROM peer_accounts"
            " WHERE tenant = ? AND user = ?",
            (tenant, user),
        )
        if not rows:
            return None
        key, version, devices, pinned = rows[0]
        assert isinstance(key, bytes) and isinstance(devices, bytes)
        return PinnedAccount(key, int(str(version)), decode_devices(devices), int(str(pinned)))

    def pin_account(
        self,
        tenant: str,
        user: str,
        account_key: bytes,
        version: int,
        devices: Sequence[ListedDevice],
    ) -> None:
        """Record ``account_key`` and list ``version`` of ``user`` as accepted."""
        with self._txn() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO peer_accounts"
                " (tenant, user, account_key, version, devices, pinned_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, user, account_key, version, encode_devices(devices), self._clock.now_ms()),
            )

    def save_pending_link(
        self, tenant: str, user: str, request_id: bytes, link_private: bytes, expires_at_ms: int
    ) -> None:
        """Remember the link request this device waits on (one at a time)."""
        with self._txn() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO pending_link"
                " (id, tenant, user, request_id, link_private, expires_at_ms)"
                " VALUES (1, ?, ?, ?, ?, ?)",
                (tenant, user, request_id, link_private, expires_at_ms),
            )

    def pending_link(self) -> PendingLinkState | None:
        """The link request this device waits on, if any."""
        rows = self._query(
            "SELECT tenant, user, request_id, link_private, expires_at_ms FROM pending_link"
        )
        if not rows:
            return None
        tenant, user, request_id, private, expires = rows[0]
        assert isinstance(request_id, bytes) and isinstance(private, bytes)
        return PendingLinkState(str(tenant), str(user), request_id, private, int(str(expires)))

    def clear_pending_link(self) -> None:
        """Forget the link request (approved, or given up)."""
        with self._txn() as conn:
            conn.execute("DELETE FROM pending_link")

    # -- prekeys ------------------------------------------------------------------------

    def save_prekeys(self, prekeys: Sequence[Prekey]) -> None:
        """Store prekey pairs (signed ones carry their signature)."""
        with self._txn() as conn:
            self._insert_prekeys(conn, prekeys)

    @staticmethod
    def _insert_prekeys(conn: sqlite3.Connection, prekeys: Sequence[Prekey]) -> None:
        conn.executemany(
            "INSERT INTO prekeys (key_id, signed, private, public, signature)"
            " VALUES (?, ?, ?, ?, ?)",
            [(p.key_id, bool(p.signature), p.private, p.public, p.signature) for p in prekeys],
        )

    def prekeys(self, key_id: int | None = None) -> list[Prekey]:
        """Stored prekeys in id order (only the one with ``key_id`` if given)."""
        sql = "SELECT key_id, private, public, signature FROM prekeys"
        if key_id is None:
            rows = self._query(sql + " ORDER BY key_id")
        else:
            rows = self._query(sql + " WHERE key_id = ?", (key_id,))
        out = []
        for kid, private, public, signature in rows:
            assert isinstance(private, bytes) and isinstance(public, bytes)
            assert isinstance(signature, bytes)
            out.append(Prekey(int(str(kid)), private, public, signature))
        return out

    def remove_prekey(self, key_id: int) -> bool:
        """Delete a prekey (a one-time prekey once it has been used); return if it existed."""
        with self._txn() as conn:
            return conn.execute("DELETE FROM prekeys WHERE key_id = ?", (key_id,)).rowcount == 1

    def next_prekey_id(self) -> int:
        """An id greater than any prekey id stored so far."""
        rows = self._query("SELECT COALESCE(MAX(key_id), 0) FROM prekeys")
        return int(str(rows[0][0])) + 1

    # -- PQXDH prekeys (DevicePrekeys) ---------------------------------------------------

    def device_prekeys(self) -> DevicePrekeys | None:
        """Every private prekey of this device (X25519 and ML-KEM seeds), or None.

        None before :meth:`save_device_prekeys` (or without an identity). A state file of
        the release before PQXDH, whose signed and one-time X25519 prekeys live in the
        ``prekeys`` table, is converted on first use: those keys move here (and leave that
        table); it then has no last-resort PQ prekey, which ``replenish_prekeys`` adds.
        """
        with self._txn() as conn:
            counter = conn.execute("SELECT next_id FROM device_prekey_counter").fetchone()
            identity = self._identity(conn)
            if identity is None:
                return None
            if counter is None:
                return self._convert_old_prekeys(conn, identity)
            keys = DevicePrekeys(identity, next_id=int(counter[0]))
            pools = {
                "signed": keys.signed,
                "last_resort": keys.last_resort,
                "one_time_ec": keys.one_time_ec,
                "one_time_pq": keys.one_time_pq,
            }
            for key_id, kind, private in conn.execute(
                "SELECT key_id, kind, private FROM device_prekeys ORDER BY key_id"
            ):
                pools[kind][int(key_id)] = bytes(private)
            return keys

    def save_device_prekeys(
        self, prekeys: DevicePrekeys, *, unpublished: Iterable[int] = ()
    ) -> None:
        """Store ``prekeys`` in place of the stored ones (one transaction).

        Keys no longer in ``prekeys`` (consumed) are deleted. Key ids in ``unpublished``
        are marked as not yet uploaded (see :meth:`unpublished_prekey_ids`); kept keys keep
        their mark. For a read-modify-write that must not race another one (consuming
        keys while new ones are added), load and save inside :meth:`transaction`.
        """
        rows = [
            (key_id, kind, private)
            for kind, pool in (
                ("signed", prekeys.signed),
                ("last_resort", prekeys.last_resort),
                ("one_time_ec", prekeys.one_time_ec),
                ("one_time_pq", prekeys.one_time_pq),
            )
            for key_id, private in pool.items()
        ]
        with self._txn() as conn:
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS kept_prekeys (key_id INTEGER PRIMARY KEY)"
            )
            conn.execute("DELETE FROM kept_prekeys")
            conn.executemany("INSERT INTO kept_prekeys VALUES (?)", [(r[0],) for r in rows])
            conn.execute(
                "DELETE FROM device_prekeys WHERE key_id NOT IN (SELECT key_id FROM kept_prekeys)"
            )
            conn.executemany(
                "INSERT INTO device_prekeys (key_id, kind, private) VALUES (?, ?, ?)"
                " ON CONFLICT (key_id) DO UPDATE"
                " SET kind = excluded.kind, private = excluded.private",
                rows,
            )
            conn.executemany(
                "UPDATE device_prekeys SET unpublished = 1 WHERE key_id = ?",
                [(key_id,) for key_id in unpublished],
            )
            conn.execute(
                "INSERT INTO device_prekey_counter (id, next_id) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET next_id = excluded.next_id",
                (prekeys.next_id,),
            )

    def unpublished_prekey_ids(self) -> set[int]:
        """Ids of stored prekeys generated but not yet acknowledged by the key directory."""
        rows = self._query("SELECT key_id FROM device_prekeys WHERE unpublished = 1")
        return {int(str(r[0])) for r in rows}

    def mark_prekeys_published(self, key_ids: Iterable[int]) -> None:
        """Record that the key directory holds the prekeys ``key_ids``."""
        with self._txn() as conn:
            conn.executemany(
                "UPDATE device_prekeys SET unpublished = 0 WHERE key_id = ?",
                [(key_id,) for key_id in key_ids],
            )

    def _identity(self, conn: sqlite3.Connection) -> Identity | None:
        row = conn.execute("SELECT signing_private, dh_private FROM identity").fetchone()
        return None if row is None else Identity.from_private_bytes(bytes(row[0]), bytes(row[1]))

    def _convert_old_prekeys(
        self, conn: sqlite3.Connection, identity: Identity
    ) -> DevicePrekeys | None:
        rows = conn.execute(
            "SELECT key_id, signed, private FROM prekeys ORDER BY key_id"
        ).fetchall()
        if not rows:
            return None
        keys = DevicePrekeys(identity, next_id=max(int(r[0]) for r in rows) + 1)
        for key_id, signed, private in rows:
            (keys.signed if signed else keys.one_time_ec)[int(key_id)] = bytes(private)
        self.save_device_prekeys(keys)  # joins this transaction
        conn.execute("DELETE FROM prekeys")  # no private key lingers in the old table
        return keys

    # -- end-to-end sessions ------------------------------------------------------------

    def session_record(self, peer: Address) -> bytes | None:
        """The serialized sessions with device ``peer`` (see relay.sdk.e2ee), or None."""
        rows = self._query("SELECT record FROM sessions WHERE peer = ?", (str(peer),))
        if not rows:
            return None
        record = rows[0][0]
        assert isinstance(record, bytes)
        return record

    def save_session_record(self, peer: Address, record: bytes) -> None:
        """Store the sessions with ``peer`` (replacing them)."""
        with self._txn() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO sessions (peer, tenant, user, device, record, updated_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (str(peer), peer.tenant, peer.user, peer.device, record, self._clock.now_ms()),
            )

    def delete_session_records(self, peers: Sequence[Address]) -> int:
        """Forget the sessions with ``peers``; return how many devices had some."""
        with self._txn() as conn:
            return sum(
                conn.execute("DELETE FROM sessions WHERE peer = ?", (str(p),)).rowcount
                for p in peers
            )

    def session_peers(self, tenant: str, user: str) -> list[Address]:
        """The devices of ``user`` this device has sessions with, by device number."""
        rows = self._query(
            "SELECT device FROM sessions WHERE tenant = ? AND user = ? ORDER BY device",
            (tenant, user),
        )
        return [Address(tenant, user, int(str(r[0]))) for r in rows]

    # -- received messages ---------------------------------------------------------------

    def accept(self, messages: Sequence[ReceivedMessage]) -> int:
        """Add messages not received before to the inbox, durably; return how many were new.

        A message is identified by (sender, message_id). One seen before (whether still
        in the inbox or already acknowledged, within the retention) is skipped.
        """
        now = self._clock.now_ms()
        new = 0
        with self._txn() as conn:
            for m in messages:
                sender = str(m.sender)
                cur = conn.execute(
                    "INSERT OR IGNORE INTO received (sender, message_id, received_ms)"
                    " VALUES (?, ?, ?)",
                    (sender, m.message_id, now),
                )
                if cur.rowcount == 1:
                    conn.execute(
                        "INSERT INTO inbox (sender, message_id, content, server_timestamp_ms)"
                        " VALUES (?, ?, ?, ?)",
                        (sender, m.message_id, m.content, m.server_timestamp_ms),
                    )
                    new += 1
        return new

    def inbox(self, after: int = 0, limit: int = 64) -> list[InboxEntry]:
        """Up to ``limit`` inbox entries with ``seq > after``, in arrival order."""
        rows = self._query(
            "SELECT seq, sender, message_id, content, server_timestamp_ms FROM inbox"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        out = []
        for seq, sender, message_id, content, ts in rows:
            assert isinstance(message_id, bytes) and isinstance(content, bytes)
            message = ReceivedMessage(parse_address(str(sender)), message_id, content, int(str(ts)))
            out.append(InboxEntry(int(str(seq)), message))
        return out

    def remove_from_inbox(self, messages: Sequence[ReceivedMessage]) -> int:
        """Drop acknowledged messages from the inbox (idempotent); return how many went."""
        with self._txn() as conn:
            return sum(
                conn.execute(
                    "DELETE FROM inbox WHERE sender = ? AND message_id = ?",
                    (str(m.sender), m.message_id),
                ).rowcount
                for m in messages
            )

    def was_received(self, sender: Address, message_id: bytes) -> bool:
        """Whether (sender, message_id) was received (and is still remembered)."""
        rows = self._query(
            "SELECT 1 FROM received WHERE sender = ? AND message_id = ?", (str(sender), message_id)
        )
        return bool(rows)

    def prune(self) -> int:
        """Forget received ids older than the retention; return how many went.

        Ids of messages still in the inbox are kept.
        """
        cutoff = self._clock.now_ms() - DEDUP_RETENTION_MS
        with self._txn() as conn:
            return conn.execute(
                "DELETE FROM received WHERE received_ms < ? AND NOT EXISTS (SELECT 1 FROM inbox"
                " WHERE inbox.sender = received.sender AND inbox.message_id = received.message_id)",
                (cutoff,),
            ).rowcount
