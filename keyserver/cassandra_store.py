"""The key directory's stores on Cassandra (tables in ``0002_keys.cql`` to ``0004_accounts.cql``).

Atomicity comes from lightweight transactions (Paxos), so it holds across processes:

- Device numbers: the ``devices`` partition of a user carries static columns
  ``last_device`` and ``identity_keys``. A registration is one conditional batch on
  that partition: ``IF last_device = <read value>`` it sets ``last_device = n``, maps the
  identity key to ``n`` and inserts device ``n``. A lost race re-reads and retries, so
  each registration gets its own number and one identity key never gets two devices.
- Accounts: the account key and the latest signed list are more static columns of the
  same partition (``account_key``, ``list_version``, ``list_timestamp_ms``,
  ``list_devices``, ``list_signature``). Every change of a user's devices is therefore
  ONE conditional batch on one partition, which Cassandra applies all or nothing:
  ``IF list_version = <expected> AND last_device = <read value>`` it stores the new list
  and, in the same batch, inserts the new device (``last_device = n``,
  ``identity_keys[k] = n``; create, reset, add) and/or sets ``removed_at_ms`` on the
  removed devices' rows (remove; a reset removes every device of the old list). Of two
  concurrent changes read at the same version, one batch applies and the other's
  condition fails: it answers False, as ``AccountDirectory`` asks (no retry: the caller
  re-reads and decides again). Because legacy registrations also move ``last_device``,
  a change can never race one of them into giving a number out twice. A creation
  without ``replaces`` is ``IF list_version = null AND last_device = null``.
- Link requests: ``link_requests`` (by request id) and ``link_requests_by_user`` (a
  user's requests in creation order), written together in a logged batch ``USING TTL``
  of the time left, so they vanish when they expire; reads also skip rows whose
  ``expires_at_ms`` has passed by the caller's clock (TTLs count whole seconds). An
  approval is ``UPDATE ... IF approved_device = null AND expires_at_ms > <now>``: once.
  The ``max_pending`` check is read-then-write (per user it takes turns within a
  process, not across processes): concurrent requests in several processes may pass it
  slightly, as the ``max_held`` check of prekeys may.
- Once-only records: ``INSERT ... IF NOT EXISTS USING TTL``, with a random ``claimant``
  per caller; an entry that expired by the caller's clock but not yet by its TTL is
  taken over by ``UPDATE ... IF claimant = <the old one>``. Either way one caller wins.
- One-time prekeys: a claim is ``DELETE ... IF EXISTS`` on the lowest key read from
  the pool; only one claimer's delete applies, so a key is handed out at most once.
  A lost race tries the next key. Publishing records each key_id with
  ``INSERT ... IF NOT EXISTS`` in ``prekey_ids`` before the key enters the pool, so a
  claimed (deleted) key_id can never be put back by a retried publish. The one-time PQ
  pool (``one_time_pq_prekeys``, ``pq_prekey_ids``) works the same way.
- Bundles: each one-time key (X25519, PQ) is claimed by its own lightweight transaction;
  the two claims of one bundle are not one transaction (Cassandra has none across
  tables), so a fetch that fails between them may burn a key: at most once, never twice.
- Removal: ``removed_at_ms`` is set by ``UPDATE ... IF identity_key != null AND
  removed_at_ms = null``; the row stays, so ``last_device`` and ``identity_keys`` keep
  its number and identity key taken.

Within one process, operations on one user (registrations and account changes share
one lock; link requests have their own) or device (prekeys) take turns on an asyncio
lock: not for safety (the transactions give that) but to keep Paxos contention, and
its timeouts, to what separate processes cause.

A lightweight transaction that times out under contention may still apply: the loops
re-read and retry (an account change, an approval or a once-only record that then
finds its own write in place answers True). A claim that timed out may thus leave a
key unclaimable by anyone (at most once, never twice). A publish that fails after
recording key_ids leaves those ids out of the pool for good; ``held`` tells the device
to publish more. The ``max_held`` check is read-then-write: concurrent publishes may
pass it slightly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from keyserver.cassandra_accounts import (
    CassandraAccountDirectory,
    CassandraLinkRequests,
    CassandraOnceOnly,
)
from keyserver.cassandra_base import (
    DEVICE_COLUMNS,
    LIST_DEVICES,
    MAX_ROUNDS,
    WHERE_DEVICE,
    backoff,
    device_key,
)
from keyserver.model import (
    BundleKeys,
    DeviceRecord,
    OneTimePrekey,
    PqPrekey,
    PrekeysAdded,
    SignedPrekey,
)
from keyserver.ports import KeyStores
from relay.common.cassandra.errors import is_contention
from relay.common.cassandra.session import CassandraSession
from relay.common.cassandra.turns import Turns
from relay.errors import Unavailable
from relay.model import Address

#: Unclaimed keys read per claim round (a lost race tries the next one).
CLAIM_CANDIDATES = 8
#: Key ids per conditional batch when publishing (keeps batches small).
PUBLISH_CHUNK = 50

_DEVICE_COLUMNS = DEVICE_COLUMNS
_NUMBERING = (
    "SELECT last_device, identity_keys FROM {ks}.devices WHERE tenant = ? AND user = ? LIMIT 1"
)
_REGISTER = (
    "BEGIN BATCH"
    " UPDATE {ks}.devices SET last_device = ?, identity_keys[?] = ?"
    " WHERE tenant = ? AND user = ? IF last_device = ?;"
    " INSERT INTO {ks}.devices (tenant, user, device, identity_key, identity_dh_key,"
    " identity_dh_signature, registered_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?);"
    " APPLY BATCH"
)
_WHERE_DEVICE = WHERE_DEVICE
_GET = f"SELECT {_DEVICE_COLUMNS} FROM {{ks}}.devices {_WHERE_DEVICE}"
_LIST = LIST_DEVICES
_SET_SIGNED = (
    "INSERT INTO {ks}.signed_prekeys (tenant, user, device, key_id, public_key, signature)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_REMOVE = (
    f"UPDATE {{ks}}.devices SET removed_at_ms = ? {_WHERE_DEVICE}"
    " IF identity_key != null AND removed_at_ms = null"
)
_SIGNED = f"SELECT key_id, public_key, signature FROM {{ks}}.signed_prekeys {_WHERE_DEVICE}"
_SET_LAST_RESORT = (
    "INSERT INTO {ks}.last_resort_pq_prekeys (tenant, user, device, key_id, public_key, signature)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_LAST_RESORT = (
    f"SELECT key_id, public_key, signature FROM {{ks}}.last_resort_pq_prekeys {_WHERE_DEVICE}"
)


_key = device_key


def _record(tenant: str, user: str, row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        address=Address(tenant, user, int(row[0])),
        identity_key=bytes(row[1]),
        identity_dh_key=bytes(row[2]),
        identity_dh_signature=bytes(row[3]),
        registered_at_ms=int(row[4]),
        removed_at_ms=None if row[5] is None else int(row[5]),
    )


_backoff = backoff


class CassandraDeviceDirectory:
    """DeviceDirectory on the ``devices`` table (see ``keyserver.ports``)."""

    def __init__(self, session: CassandraSession, turns: Turns | None = None) -> None:
        self._session = session
        self._turns = turns or Turns()

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
        async with self._turns.take((tenant, user)):
            for round_ in range(MAX_ROUNDS):
                rows = await self._session.execute(
                    _NUMBERING, (tenant, user), op="register: read device numbering"
                )
                last = rows[0][0] if rows else None
                known = (rows[0][1] if rows else None) or {}
                if identity_key in known:
                    existing = await self._get_any(Address(tenant, user, int(known[identity_key])))
                    if existing is not None:
                        return existing
                number = int(last or 0) + 1
                record = DeviceRecord(
                    Address(tenant, user, number),
                    identity_key,
                    identity_dh_key,
                    identity_dh_signature,
                    registered_at_ms,
                )
                params = (
                    *(number, identity_key, number, tenant, user, last),
                    *(tenant, user, number, identity_key, identity_dh_key),
                    *(identity_dh_signature, registered_at_ms),
                )
                try:
                    rows = await self._session.execute(
                        _REGISTER, params, op="register: assign a device number", idempotent=False
                    )
                except Unavailable as exc:
                    if not is_contention(exc):
                        raise
                    rows = []  # unknown outcome: the next round reads what happened
                if rows and rows[0][0]:
                    return record
                await _backoff(round_)
        raise Unavailable(f"register {tenant}/{user}: gave up after {MAX_ROUNDS} contended rounds")

    async def find_identity(
        self, tenant: str, user: str, identity_key: bytes
    ) -> DeviceRecord | None:
        """The device ever registered with ``identity_key`` (removed or not), or None."""
        rows = await self._session.execute(
            _NUMBERING, (tenant, user), op="find a device by identity key"
        )
        known = (rows[0][1] if rows else None) or {}
        if identity_key not in known:
            return None
        return await self._get_any(Address(tenant, user, int(known[identity_key])))

    async def get(self, address: Address) -> DeviceRecord | None:
        """Return the record of the device at ``address``; None if none or removed."""
        record = await self._get_any(address)
        return None if record is None or record.removed_at_ms is not None else record

    async def _get_any(self, address: Address) -> DeviceRecord | None:
        rows = await self._session.execute(_GET, _key(address), op="get a device")
        if not rows or rows[0][0] is None or rows[0][1] is None:
            return None
        return _record(address.tenant, address.user, rows[0])

    async def list(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return the devices of (tenant, user) not removed, in ascending device number."""
        rows = await self._session.execute(_LIST, (tenant, user), op="list devices")
        return tuple(
            _record(tenant, user, row)
            for row in rows
            if row[0] is not None and row[1] is not None and row[5] is None
        )

    async def remove(self, address: Address, removed_at_ms: int) -> bool:
        """Set ``removed_at_ms`` (a lightweight transaction); False if none or removed."""
        for _ in range(MAX_ROUNDS):
            try:
                rows = await self._session.execute(
                    _REMOVE,
                    (removed_at_ms, *_key(address)),
                    op="remove a device",
                    idempotent=False,
                )
            except Unavailable as exc:
                if not is_contention(exc):
                    raise
                # Unknown outcome: read what happened; try again if nothing did.
                record = await self._get_any(address)
                if record is None:
                    return False
                if record.removed_at_ms is not None:
                    return record.removed_at_ms == removed_at_ms
                continue
            return bool(rows and rows[0][0])
        raise Unavailable(f"remove device {address}: gave up after {MAX_ROUNDS} rounds")


class _Pool:
    """A one-time key pool: ``table`` holds unclaimed keys, ``ids_table`` every key_id.

    ``columns`` are the value columns after ``key_id`` (``public_key`` [, ``signature``]).
    """

    def __init__(
        self, session: CassandraSession, table: str, ids_table: str, columns: tuple[str, ...]
    ) -> None:
        self._session = session
        self._turns = Turns()
        self._name = table
        names = ", ".join(columns)
        self._known_ids = f"SELECT key_id FROM {{ks}}.{ids_table} {_WHERE_DEVICE} AND key_id IN ?"
        self._record_id = (
            f"INSERT INTO {{ks}}.{ids_table} (tenant, user, device, key_id)"
            " VALUES (?, ?, ?, ?) IF NOT EXISTS;"
        )
        marks = ", ".join("?" * (4 + len(columns)))
        self._add = (
            f"INSERT INTO {{ks}}.{table} (tenant, user, device, key_id, {names}) VALUES ({marks})"
        )
        self._count = f"SELECT COUNT(*) FROM {{ks}}.{table} {_WHERE_DEVICE}"
        self._candidates = f"SELECT key_id, {names} FROM {{ks}}.{table} {_WHERE_DEVICE} LIMIT ?"
        self._claim = f"DELETE FROM {{ks}}.{table} {_WHERE_DEVICE} AND key_id = ? IF EXISTS"

    async def add(
        self, device: Address, keys: Sequence[tuple[Any, ...]], max_held: int
    ) -> PrekeysAdded:
        """Add ``keys`` (``(key_id, *columns)``) idempotently, all or nothing in ``max_held``."""
        first: dict[int, tuple[Any, ...]] = {}
        for key in keys:
            first.setdefault(int(key[0]), key)
        unique = list(first.values())
        async with self._turns.take(("add", device)):
            for round_ in range(MAX_ROUNDS):
                known = await self._known(device, [int(k[0]) for k in unique])
                held = await self.count(device)
                new = [k for k in unique if int(k[0]) not in known]
                if not new:
                    return PrekeysAdded(held=held, accepted=True)
                if held + len(new) > max_held:
                    return PrekeysAdded(held=held, accepted=False)
                if await self._record_ids(device, new):
                    return PrekeysAdded(held=held + len(new), accepted=True)
                await _backoff(round_)
        raise Unavailable(f"publish prekeys of {device}: gave up after {MAX_ROUNDS} rounds")

    async def _known(self, device: Address, key_ids: list[int]) -> set[int]:
        chunks = [key_ids[i : i + 100] for i in range(0, len(key_ids), 100)]
        found = await self._session.execute_many(
            [(self._known_ids, (*_key(device), chunk)) for chunk in chunks],
            op="publish prekeys: read known key ids",
        )
        return {int(row[0]) for rows in found for row in rows}

    async def _record_ids(self, device: Address, new: list[tuple[Any, ...]]) -> bool:
        """Record the key ids (a conditional batch per chunk), then pool the keys.

        False if a concurrent publish recorded one of them first (nothing of that chunk
        is written; the caller starts over).
        """
        for i in range(0, len(new), PUBLISH_CHUNK):
            chunk = new[i : i + PUBLISH_CHUNK]
            batch = "BEGIN BATCH " + " ".join([self._record_id] * len(chunk)) + " APPLY BATCH"
            params = [v for k in chunk for v in (*_key(device), k[0])]
            try:
                rows = await self._session.execute(
                    batch, params, op="publish prekeys: record key ids", idempotent=False
                )
            except Unavailable as exc:
                if not is_contention(exc):
                    raise
                return False
            if not rows or not rows[0][0]:
                return False
            await self._session.execute_many(
                [(self._add, (*_key(device), *k)) for k in chunk],
                op="publish prekeys: pool the keys",
            )
        return True

    async def claim(self, device: Address) -> tuple[Any, ...] | None:
        """Claim the unclaimed key with the lowest key_id (``DELETE ... IF EXISTS``)."""
        async with self._turns.take(("claim", device)):
            for round_ in range(MAX_ROUNDS):
                candidates = await self._session.execute(
                    self._candidates,
                    (*_key(device), CLAIM_CANDIDATES),
                    op=f"claim a prekey: read the pool {self._name}",
                )
                if not candidates:
                    return None
                for candidate in candidates:
                    try:
                        rows = await self._session.execute(
                            self._claim,
                            (*_key(device), candidate[0]),
                            op=f"claim a prekey of {self._name}",
                            idempotent=False,
                        )
                    except Unavailable as exc:
                        if not is_contention(exc):
                            raise
                        continue  # unknown outcome: never hand this one out
                    if rows and rows[0][0]:
                        return tuple(candidate)
                await _backoff(round_)
        raise Unavailable(f"claim a prekey of {device}: gave up after {MAX_ROUNDS} rounds")

    async def count(self, device: Address) -> int:
        """How many unclaimed keys ``device`` holds."""
        rows = await self._session.execute(self._count, _key(device), op="count prekeys")
        return int(rows[0][0]) if rows else 0


class CassandraPrekeyStore:
    """PrekeyStore on ``signed_prekeys``, ``one_time_prekeys`` and ``prekey_ids``."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        self._pool = _Pool(session, "one_time_prekeys", "prekey_ids", ("public_key",))

    async def set_signed_prekey(self, device: Address, prekey: SignedPrekey) -> None:
        """Store ``prekey`` as the signed prekey of ``device``, replacing any previous one."""
        params = (*_key(device), prekey.key_id, prekey.public_key, prekey.signature)
        await self._session.execute(_SET_SIGNED, params, op="set a signed prekey")

    async def signed_prekey(self, device: Address) -> SignedPrekey | None:
        """Return the current signed prekey of ``device``, or None."""
        rows = await self._session.execute(_SIGNED, _key(device), op="get a signed prekey")
        if not rows:
            return None
        key_id, public_key, signature = rows[0]
        return SignedPrekey(int(key_id), bytes(public_key), bytes(signature))

    async def add_one_time_prekeys(
        self, device: Address, prekeys: Sequence[OneTimePrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` idempotently by key_id, all or nothing within ``max_held``."""
        return await self._pool.add(device, [(p.key_id, p.public_key) for p in prekeys], max_held)

    async def claim_one_time_prekey(self, device: Address) -> OneTimePrekey | None:
        """Claim the unclaimed key with the lowest key_id (``DELETE ... IF EXISTS``)."""
        row = await self._pool.claim(device)
        return None if row is None else OneTimePrekey(int(row[0]), bytes(row[1]))

    async def count_one_time_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` holds."""
        return await self._pool.count(device)


class CassandraPqPrekeyStore:
    """PqPrekeyStore on ``last_resort_pq_prekeys``, ``one_time_pq_prekeys``, ``pq_prekey_ids``."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        self._pool = _Pool(
            session, "one_time_pq_prekeys", "pq_prekey_ids", ("public_key", "signature")
        )

    async def set_last_resort_pq_prekey(self, device: Address, prekey: PqPrekey) -> None:
        """Store ``prekey`` as the last-resort PQ prekey of ``device``, replacing any other."""
        params = (*_key(device), prekey.key_id, prekey.public_key, prekey.signature)
        await self._session.execute(_SET_LAST_RESORT, params, op="set a last-resort PQ prekey")

    async def last_resort_pq_prekey(self, device: Address) -> PqPrekey | None:
        """Return the last-resort PQ prekey of ``device``, or None."""
        rows = await self._session.execute(
            _LAST_RESORT, _key(device), op="get a last-resort PQ prekey"
        )
        if not rows:
            return None
        key_id, public_key, signature = rows[0]
        return PqPrekey(int(key_id), bytes(public_key), bytes(signature))

    async def add_one_time_pq_prekeys(
        self, device: Address, prekeys: Sequence[PqPrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` idempotently by key_id, all or nothing within ``max_held``."""
        keys = [(p.key_id, p.public_key, p.signature) for p in prekeys]
        return await self._pool.add(device, keys, max_held)

    async def claim_one_time_pq_prekey(self, device: Address) -> PqPrekey | None:
        """Claim the unclaimed PQ key with the lowest key_id (``DELETE ... IF EXISTS``)."""
        row = await self._pool.claim(device)
        return None if row is None else PqPrekey(int(row[0]), bytes(row[1]), bytes(row[2]))

    async def count_one_time_pq_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time PQ prekeys ``device`` holds."""
        return await self._pool.count(device)


class CassandraPrekeyHandout:
    """PrekeyHandout over the two prekey stores: one lightweight transaction per claim."""

    def __init__(self, prekeys: CassandraPrekeyStore, pq_prekeys: CassandraPqPrekeyStore) -> None:
        self._prekeys = prekeys
        self._pq_prekeys = pq_prekeys

    async def claim_bundle_keys(self, device: Address) -> BundleKeys:
        """Signed prekeys and one one-time key of each pool; see PrekeyHandout."""
        signed, last_resort = await asyncio.gather(
            self._prekeys.signed_prekey(device), self._pq_prekeys.last_resort_pq_prekey(device)
        )
        if signed is None:
            return BundleKeys(None, None, last_resort, last_resort is not None)
        if last_resort is None:
            # Without a fallback, spend an X25519 key only if a PQ key was found.
            pq = await self._pq_prekeys.claim_one_time_pq_prekey(device)
            if pq is None:
                return BundleKeys(signed, None, None, False)
            one_time = await self._prekeys.claim_one_time_prekey(device)
        else:
            one_time, pq = await asyncio.gather(
                self._prekeys.claim_one_time_prekey(device),
                self._pq_prekeys.claim_one_time_pq_prekey(device),
            )
        if pq is None:
            return BundleKeys(signed, one_time, last_resort, True)
        return BundleKeys(signed, one_time, pq, False)


def cassandra_key_stores(session: CassandraSession) -> KeyStores:
    """Every key directory store on the keyspace of ``session`` (migrated)."""
    prekeys = CassandraPrekeyStore(session)
    pq_prekeys = CassandraPqPrekeyStore(session)
    users = Turns()  # registrations and account changes of one user take turns
    return KeyStores(
        devices=CassandraDeviceDirectory(session, users),
        accounts=CassandraAccountDirectory(session, users),
        links=CassandraLinkRequests(session),
        once=CassandraOnceOnly(session),
        prekeys=prekeys,
        pq_prekeys=pq_prekeys,
        handout=CassandraPrekeyHandout(prekeys, pq_prekeys),
    )
