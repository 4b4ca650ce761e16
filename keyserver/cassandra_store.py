"""The key directory's stores on Cassandra (tables in ``0002_keys.cql``).

Atomicity comes from lightweight transactions (Paxos), so it holds across processes:

- Device numbers: the ``devices`` partition of a user carries static columns
  ``last_device`` and ``identity_keys``. A registration is one conditional batch on
  that partition: ``IF last_device = <read value>`` it sets ``last_device = n``, maps the
  identity key to ``n`` and inserts device ``n``. A lost race re-reads and retries, so
  each registration gets its own number and one identity key never gets two devices.
- One-time prekeys: a claim is ``DELETE ... IF EXISTS`` on the lowest key read from
  the pool; only one claimer's delete applies, so a key is handed out at most once.
  A lost race tries the next key. Publishing records each key_id with
  ``INSERT ... IF NOT EXISTS`` in ``prekey_ids`` before the key enters the pool, so a
  claimed (deleted) key_id can never be put back by a retried publish.

Within one process, operations on one user (registration) or device (prekeys) take
turns on an asyncio lock: not for safety (the transactions give that) but to keep
Paxos contention, and its timeouts, to what separate processes cause.

A lightweight transaction that times out under contention may still apply: the loops
re-read and retry. A claim that timed out may thus leave a key unclaimable by anyone
(at most once, never twice). A publish that fails after recording key_ids leaves those
ids out of the pool for good; ``held`` tells the device to publish more. The
``max_held`` check is read-then-write: concurrent publishes may pass it slightly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from keyserver.model import DeviceRecord, OneTimePrekey, PrekeysAdded, SignedPrekey
from relay.errors import Unavailable
from relay.model import Address
from relay.stores.cassandra.errors import is_contention
from relay.stores.cassandra.session import CassandraSession
from relay.stores.cassandra.turns import Turns

#: Lightweight-transaction rounds before giving up with Unavailable.
MAX_ROUNDS = 200
#: Unclaimed keys read per claim round (a lost race tries the next one).
CLAIM_CANDIDATES = 8
#: Key ids per conditional batch when publishing (keeps batches small).
PUBLISH_CHUNK = 50

_DEVICE_COLUMNS = "device, identity_key, identity_dh_key, identity_dh_signature, registered_at_ms"
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
_WHERE_DEVICE = "WHERE tenant = ? AND user = ? AND device = ?"
_GET = f"SELECT {_DEVICE_COLUMNS} FROM {{ks}}.devices {_WHERE_DEVICE}"
_LIST = f"SELECT {_DEVICE_COLUMNS} FROM {{ks}}.devices WHERE tenant = ? AND user = ?"
_SET_SIGNED = (
    "INSERT INTO {ks}.signed_prekeys (tenant, user, device, key_id, public_key, signature)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_SIGNED = f"SELECT key_id, public_key, signature FROM {{ks}}.signed_prekeys {_WHERE_DEVICE}"
_KNOWN_IDS = f"SELECT key_id FROM {{ks}}.prekey_ids {_WHERE_DEVICE} AND key_id IN ?"
_RECORD_ID = (
    "INSERT INTO {ks}.prekey_ids (tenant, user, device, key_id) VALUES (?, ?, ?, ?) IF NOT EXISTS;"
)
_ADD = (
    "INSERT INTO {ks}.one_time_prekeys (tenant, user, device, key_id, public_key)"
    " VALUES (?, ?, ?, ?, ?)"
)
_COUNT = f"SELECT COUNT(*) FROM {{ks}}.one_time_prekeys {_WHERE_DEVICE}"
_CANDIDATES = f"SELECT key_id, public_key FROM {{ks}}.one_time_prekeys {_WHERE_DEVICE} LIMIT ?"
_CLAIM = f"DELETE FROM {{ks}}.one_time_prekeys {_WHERE_DEVICE} AND key_id = ? IF EXISTS"


def _key(device: Address) -> tuple[str, str, int]:
    return (device.tenant, device.user, device.device)


def _record(tenant: str, user: str, row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        address=Address(tenant, user, int(row[0])),
        identity_key=bytes(row[1]),
        identity_dh_key=bytes(row[2]),
        identity_dh_signature=bytes(row[3]),
        registered_at_ms=int(row[4]),
    )


async def _backoff(round_: int) -> None:
    """Jittered pause after a lost race with another process (not synchronisation)."""
    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * round_)))


class CassandraDeviceDirectory:
    """DeviceDirectory on the ``devices`` table (see ``keyserver.ports``)."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        self._turns = Turns()

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
                    existing = await self.get(Address(tenant, user, int(known[identity_key])))
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

    async def get(self, address: Address) -> DeviceRecord | None:
        """Return the record of the device at ``address``, or None."""
        rows = await self._session.execute(_GET, _key(address), op="get a device")
        if not rows or rows[0][0] is None:
            return None
        return _record(address.tenant, address.user, rows[0])

    async def list(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return the devices of (tenant, user) in ascending device number."""
        rows = await self._session.execute(_LIST, (tenant, user), op="list devices")
        return tuple(_record(tenant, user, row) for row in rows if row[0] is not None)


class CassandraPrekeyStore:
    """PrekeyStore on ``signed_prekeys``, ``one_time_prekeys`` and ``prekey_ids``."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        self._turns = Turns()

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
        first: dict[int, OneTimePrekey] = {}
        for prekey in prekeys:
            first.setdefault(prekey.key_id, prekey)
        unique = list(first.values())
        async with self._turns.take(("add", device)):
            for round_ in range(MAX_ROUNDS):
                known = await self._known_ids(device, [p.key_id for p in unique])
                held = await self.count_one_time_prekeys(device)
                new = [p for p in unique if p.key_id not in known]
                if not new:
                    return PrekeysAdded(held=held, accepted=True)
                if held + len(new) > max_held:
                    return PrekeysAdded(held=held, accepted=False)
                if await self._record_ids(device, new):
                    return PrekeysAdded(held=held + len(new), accepted=True)
                await _backoff(round_)
        raise Unavailable(f"publish prekeys of {device}: gave up after {MAX_ROUNDS} rounds")

    async def _known_ids(self, device: Address, key_ids: list[int]) -> set[int]:
        chunks = [key_ids[i : i + 100] for i in range(0, len(key_ids), 100)]
        found = await self._session.execute_many(
            [(_KNOWN_IDS, (*_key(device), chunk)) for chunk in chunks],
            op="publish prekeys: read known key ids",
        )
        return {int(row[0]) for rows in found for row in rows}

    async def _record_ids(self, device: Address, new: list[OneTimePrekey]) -> bool:
        """Record the key ids (a conditional batch per chunk), then pool the keys.

        False if a concurrent publish recorded one of them first (nothing of that chunk
        is written; the caller starts over).
        """
        for i in range(0, len(new), PUBLISH_CHUNK):
            chunk = new[i : i + PUBLISH_CHUNK]
            batch = "BEGIN BATCH " + " ".join([_RECORD_ID] * len(chunk)) + " APPLY BATCH"
            params = [v for p in chunk for v in (*_key(device), p.key_id)]
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
                [(_ADD, (*_key(device), p.key_id, p.public_key)) for p in chunk],
                op="publish prekeys: pool the keys",
            )
        return True

    async def claim_one_time_prekey(self, device: Address) -> OneTimePrekey | None:
        """Claim the unclaimed key with the lowest key_id (``DELETE ... IF EXISTS``)."""
        async with self._turns.take(("claim", device)):
            for round_ in range(MAX_ROUNDS):
                candidates = await self._session.execute(
                    _CANDIDATES,
                    (*_key(device), CLAIM_CANDIDATES),
                    op="claim a prekey: read the pool",
                )
                if not candidates:
                    return None
                for key_id, public_key in candidates:
                    try:
                        rows = await self._session.execute(
                            _CLAIM,
                            (*_key(device), key_id),
                            op="claim a prekey",
                            idempotent=False,
                        )
                    except Unavailable as exc:
                        if not is_contention(exc):
                            raise
                        continue  # unknown outcome: never hand this one out
                    if rows and rows[0][0]:
                        return OneTimePrekey(int(key_id), bytes(public_key))
                await _backoff(round_)
        raise Unavailable(f"claim a prekey of {device}: gave up after {MAX_ROUNDS} rounds")

    async def count_one_time_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` holds."""
        rows = await self._session.execute(_COUNT, _key(device), op="count prekeys")
        return int(rows[0][0]) if rows else 0
