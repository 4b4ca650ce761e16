"""The key directory's account stores on Cassandra (migration ``0004_accounts.cql``).

``CassandraAccountDirectory`` (account keys and signed device lists, in static columns
of each user's ``devices`` partition: every change is one conditional batch there),
``CassandraLinkRequests`` and ``CassandraOnceOnly``. ``keyserver.cassandra_store``
holds the devices and prekeys, and its docstring the layout and atomicity argument.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from keyserver.cassandra_base import (
    LIST_DEVICES,
    MAX_ROUNDS,
    MAX_TTL_SECONDS,
    WHERE_DEVICE,
    backoff,
)
from keyserver.model import (
    AccountState,
    LinkApproval,
    NewDevice,
    PendingLink,
    PqPrekey,
    SignedPrekey,
)
from relay.accounts import DeviceList, decode_devices, encode_devices
from relay.common.cassandra.errors import is_contention
from relay.common.cassandra.session import CassandraSession
from relay.common.cassandra.turns import Turns
from relay.errors import Unavailable

#: Random bytes that tell one once-only caller from another.
CLAIMANT_BYTES = 16
_WHERE_DEVICE = WHERE_DEVICE
_backoff = backoff


_SET_LIST = (
    "account_key = ?, list_version = ?, list_timestamp_ms = ?, list_devices = ?, list_signature = ?"
)
_ACCOUNT = (
    "SELECT last_device, identity_keys, account_key, list_version, list_timestamp_ms,"
    " list_devices, list_signature FROM {ks}.devices WHERE tenant = ? AND user = ? LIMIT 1"
)
# Create, reset and add: the list and the new device, if nothing changed since the read.
_LIST_AND_DEVICE = (
    f"UPDATE {{ks}}.devices SET last_device = ?, identity_keys[?] = ?, {_SET_LIST}"
    " WHERE tenant = ? AND user = ? IF list_version = ? AND last_device = ?;"
    " INSERT INTO {ks}.devices (tenant, user, device, identity_key, identity_dh_key,"
    " identity_dh_signature, registered_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?);"
)
# Remove: the list alone, if its version is still the expected one.
_LIST_ONLY = (
    f"UPDATE {{ks}}.devices SET {_SET_LIST} WHERE tenant = ? AND user = ? IF list_version = ?;"
)
# One per removed device, in the same batch (IN is refused in conditional batches).
_MARK_REMOVED = f"UPDATE {{ks}}.devices SET removed_at_ms = ? {_WHERE_DEVICE};"


def _batch(*statements: str) -> str:
    return "BEGIN BATCH " + " ".join(statements) + " APPLY BATCH"


def _list_columns(device_list: DeviceList) -> tuple[Any, ...]:
    return (
        device_list.account_key,
        device_list.version,
        device_list.timestamp_ms,
        encode_devices(device_list.devices),
        device_list.signature,
    )


def _list_from(tenant: str, user: str, columns: Sequence[Any]) -> DeviceList | None:
    """The list stored in ``(account_key, version, timestamp_ms, devices, signature)``."""
    key, version, timestamp_ms, devices, signature = columns
    if key is None or version is None:
        return None
    return DeviceList(
        tenant,
        user,
        int(version),
        int(timestamp_ms),
        decode_devices(bytes(devices or b"")),
        bytes(key),
        bytes(signature or b""),
    )


def _new_number(device_list: DeviceList, old: DeviceList | None) -> int | None:
    """The one device number ``device_list`` adds to ``old`` (None if not exactly one)."""
    before = set(old.numbers()) if old is not None else set()
    added = [n for n in device_list.numbers() if n not in before]
    return added[0] if len(added) == 1 else None


def _ttl(expires_at_ms: int, now_ms: int) -> int:
    """Whole seconds from ``now_ms`` until ``expires_at_ms``, rounded up; at least 1.

    Cassandra's TTL 0 means "never expires", so a row already expired lives one second
    (reads skip it by ``expires_at_ms`` anyway).
    """
    return min(MAX_TTL_SECONDS, max(1, -(-(expires_at_ms - now_ms) // 1000)))


async def _lwt(session: CassandraSession, cql: str, params: Sequence[Any], op: str) -> bool | None:
    """Run one lightweight transaction: whether it applied; None if that is unknown.

    None means it timed out under contention: it may still apply. Running a transaction
    on the same partition again first completes any such earlier one, so a read after
    that next transaction sees what really happened.
    """
    try:
        rows = await session.execute(cql, params, op=op, idempotent=False)
    except Unavailable as exc:
        if not is_contention(exc):
            raise
        return None
    return bool(rows and rows[0][0])


def _add_statement(
    device_list: DeviceList,
    device: NewDevice,
    state: AccountState,
    *,
    version: int | None,
    removed: Sequence[int] = (),
    removed_at_ms: int = 0,
) -> tuple[str, tuple[Any, ...]]:
    """The batch that stores ``device_list`` with its new device numbered last + 1.

    Conditional on ``list_version = version`` and ``last_device`` as read in ``state``;
    marks ``removed`` removed at ``removed_at_ms`` in the same batch.
    """
    tenant, user = device_list.tenant, device_list.user
    number = state.last_device + 1
    params: tuple[Any, ...] = (
        *(number, device.identity_key, number, *_list_columns(device_list)),
        *(tenant, user, version, state.last_device or None),
        *(tenant, user, number, device.identity_key, device.identity_dh_key),
        *(device.identity_dh_signature, device.registered_at_ms),
    )
    for old in removed:
        params += (removed_at_ms, tenant, user, old)
    return _batch(_LIST_AND_DEVICE, *[_MARK_REMOVED] * len(removed)), params


#: What an account change writes, given what was read: a statement, or None (refused).
_Plan = Callable[[AccountState, dict[bytes, int]], Awaitable[tuple[str, tuple[Any, ...]] | None]]


class CassandraAccountDirectory:
    """AccountDirectory on the static columns of the ``devices`` partitions.

    Every change is one conditional batch on the user's partition (see the module
    docstring); a change whose condition fails answers False.
    """

    def __init__(self, session: CassandraSession, turns: Turns | None = None) -> None:
        self._session = session
        self._turns = turns or Turns()

    async def account(self, tenant: str, user: str) -> AccountState:
        """The user's account key, latest list and highest device number ever used."""
        state, _ = await self._read(tenant, user)
        return state

    async def _read(self, tenant: str, user: str) -> tuple[AccountState, dict[bytes, int]]:
        """The account state and the identity keys ever registered (key -> number)."""
        rows = await self._session.execute(_ACCOUNT, (tenant, user), op="read an account")
        if not rows:
            return AccountState(None, None, 0), {}
        last, known, *columns = rows[0]
        listed = _list_from(tenant, user, columns)
        state = AccountState(None if listed is None else listed.account_key, listed, int(last or 0))
        return state, {bytes(k): int(v) for k, v in (known or {}).items()}

    async def create(
        self, device_list: DeviceList, device: NewDevice, *, replaces: int | None = None
    ) -> bool:
        """Create (or, with ``replaces``, reset) the account; see AccountDirectory."""
        tenant, user = device_list.tenant, device_list.user

        async def plan(
            state: AccountState, known: dict[bytes, int]
        ) -> tuple[str, tuple[Any, ...]] | None:
            if replaces is None and state.exists:
                return None
            if replaces is not None and (
                state.device_list is None or state.device_list.version != replaces
            ):
                return None
            if device_list.numbers() != (state.last_device + 1,):
                return None
            if device.identity_key in known:
                return None
            old = () if state.device_list is None else state.device_list.numbers()
            removed = await self._removable(tenant, user, old)
            return _add_statement(
                device_list,
                device,
                state,
                version=replaces,
                removed=removed,
                removed_at_ms=device.registered_at_ms,
            )

        return await self._change(device_list, "create an account", plan)

    async def add_device(
        self, device_list: DeviceList, device: NewDevice, *, expected: int
    ) -> bool:
        """Store the list and register its new device if the version is still ``expected``."""

        async def plan(
            state: AccountState, known: dict[bytes, int]
        ) -> tuple[str, tuple[Any, ...]] | None:
            if state.device_list is None or state.device_list.version != expected:
                return None
            if _new_number(device_list, state.device_list) != state.last_device + 1:
                return None
            if device.identity_key in known:
                return None
            return _add_statement(device_list, device, state, version=expected)

        return await self._change(device_list, "add a device to an account", plan)

    async def remove_devices(
        self, device_list: DeviceList, removed: Sequence[int], removed_at_ms: int, *, expected: int
    ) -> bool:
        """Store the list and mark ``removed`` removed if the version is still ``expected``."""
        tenant, user = device_list.tenant, device_list.user

        async def plan(
            state: AccountState, known: dict[bytes, int]
        ) -> tuple[str, tuple[Any, ...]] | None:
            if state.device_list is None or state.device_list.version != expected:
                return None
            marked = await self._removable(tenant, user, removed)
            cql = _batch(_LIST_ONLY, *[_MARK_REMOVED] * len(marked))
            params = (*_list_columns(device_list), tenant, user, expected)
            for number in marked:
                params += (removed_at_ms, tenant, user, number)
            return cql, params

        return await self._change(device_list, "remove devices from an account", plan)

    async def _removable(self, tenant: str, user: str, numbers: Sequence[int]) -> list[int]:
        """Those of ``numbers`` that name a device of the user not removed yet."""
        if not numbers:
            return []
        rows = await self._session.execute(
            LIST_DEVICES, (tenant, user), op="read devices to remove"
        )
        live = {int(r[0]) for r in rows if r[0] is not None and r[1] is not None and r[5] is None}
        return sorted(set(numbers) & live)

    async def _change(self, device_list: DeviceList, op: str, plan: _Plan) -> bool:
        """Read the account, write what ``plan`` says (one conditional batch), say if applied.

        A batch whose condition fails answers False (another change came first). One
        whose outcome is unknown (timed out under contention) is followed by a re-read:
        True if ``device_list`` is stored now (it applied after all), else planned again.
        """
        tenant, user = device_list.tenant, device_list.user
        async with self._turns.take((tenant, user)):
            uncertain = False
            for round_ in range(MAX_ROUNDS):
                state, known = await self._read(tenant, user)
                if uncertain and state.device_list == device_list:
                    return True
                statement = await plan(state, known)
                if statement is None:
                    return False
                applied = await _lwt(self._session, *statement, op=op)
                if applied:
                    return True
                if applied is False and not uncertain:
                    return False
                uncertain = True
                await _backoff(round_)
        raise Unavailable(f"{op} {tenant}/{user}: gave up after {MAX_ROUNDS} contended rounds")


_LINK_COLUMNS = (
    "request_id, tenant, user, identity_key, identity_dh_key, identity_dh_signature,"
    " signed_prekey_id, signed_prekey, signed_prekey_signature, pq_prekey_id, pq_prekey,"
    " pq_prekey_signature, link_key, created_at_ms, expires_at_ms, approved_device,"
    " sealed_account, approved_account_key, approved_list_version,"
    " approved_list_timestamp_ms, approved_list_devices, approved_list_signature"
)
_ADD_LINK = _batch(
    "INSERT INTO {ks}.link_requests (request_id, tenant, user, identity_key, identity_dh_key,"
    " identity_dh_signature, signed_prekey_id, signed_prekey, signed_prekey_signature,"
    " pq_prekey_id, pq_prekey, pq_prekey_signature, link_key, created_at_ms, expires_at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?;",
    "INSERT INTO {ks}.link_requests_by_user (tenant, user, created_at_ms, request_id,"
    " expires_at_ms) VALUES (?, ?, ?, ?, ?) USING TTL ?;",
)
_GET_LINK = f"SELECT {_LINK_COLUMNS} FROM {{ks}}.link_requests WHERE request_id = ?"
_USER_LINKS = (
    "SELECT request_id, expires_at_ms FROM {ks}.link_requests_by_user WHERE tenant = ? AND user = ?"
)
_APPROVE = (
    "UPDATE {ks}.link_requests USING TTL ? SET approved_device = ?, sealed_account = ?,"
    " approved_account_key = ?, approved_list_version = ?, approved_list_timestamp_ms = ?,"
    " approved_list_devices = ?, approved_list_signature = ?"
    " WHERE request_id = ? IF approved_device = null AND expires_at_ms > ?"
)


def _link(row: Sequence[Any]) -> PendingLink:
    tenant, user = str(row[1]), str(row[2])
    approval = None
    if row[15] is not None:
        listed = _list_from(tenant, user, row[17:22])
        if listed is not None:
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


class CassandraLinkRequests:
    """LinkRequests on ``link_requests`` and ``link_requests_by_user`` (rows with TTLs)."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        self._turns = Turns()

    async def add(self, link: PendingLink, max_pending: int, now_ms: int) -> bool:
        """Store ``link`` unless its user has ``max_pending`` pending requests already.

        Read-then-write: requests added at once in several processes may pass the limit.
        """
        async with self._turns.take((link.tenant, link.user)):
            if len(await self.pending(link.tenant, link.user, now_ms)) >= max_pending:
                return False
            ttl = _ttl(link.expires_at_ms, now_ms)
            spk, pq = link.signed_prekey, link.last_resort_pq_prekey
            params = (
                *(link.request_id, link.tenant, link.user, link.identity_key),
                *(link.identity_dh_key, link.identity_dh_signature),
                *(spk.key_id, spk.public_key, spk.signature),
                *(pq.key_id, pq.public_key, pq.signature),
                *(link.link_key, link.created_at_ms, link.expires_at_ms, ttl),
                *(link.tenant, link.user, link.created_at_ms, link.request_id),
                *(link.expires_at_ms, ttl),
            )
            await self._session.execute(_ADD_LINK, params, op="add a link request")
            return True

    async def pending(self, tenant: str, user: str, now_ms: int) -> tuple[PendingLink, ...]:
        """The user's unexpired, unapproved requests, oldest first."""
        rows = await self._session.execute(
            _USER_LINKS, (tenant, user), op="list a user's link requests"
        )
        ids = [bytes(r[0]) for r in rows if r[1] is not None and int(r[1]) > now_ms]
        found = await self._session.execute_many(
            [(_GET_LINK, (request_id,)) for request_id in ids], op="read link requests"
        )
        links = [_link(rows[0]) for rows in found if rows and rows[0][1] is not None]
        return tuple(x for x in links if x.approval is None and x.expires_at_ms > now_ms)

    async def get(self, request_id: bytes, now_ms: int) -> PendingLink | None:
        """The request (approved or not), or None if unknown or expired."""
        rows = await self._session.execute(_GET_LINK, (request_id,), op="read a link request")
        if not rows or rows[0][1] is None or rows[0][14] is None:
            return None
        link = _link(rows[0])
        return link if link.expires_at_ms > now_ms else None

    async def approve(self, request_id: bytes, approval: LinkApproval, now_ms: int) -> bool:
        """Record ``approval`` once (``UPDATE ... IF approved_device = null``)."""
        link = await self.get(request_id, now_ms)
        if link is None or link.approval is not None:
            return False
        params = (
            _ttl(link.expires_at_ms, now_ms),
            *(approval.device, approval.sealed_account, *_list_columns(approval.device_list)),
            *(request_id, now_ms),
        )
        uncertain = False
        for round_ in range(MAX_ROUNDS):
            applied = await _lwt(self._session, _APPROVE, params, op="approve a link request")
            if applied:
                return True
            if applied is False:
                if not uncertain:
                    return False
                # An earlier round timed out: this one completed it, so a read shows it.
                after = await self.get(request_id, now_ms)
                return after is not None and after.approval == approval
            uncertain = True
            await _backoff(round_)
        raise Unavailable(f"approve a link request: gave up after {MAX_ROUNDS} contended rounds")


_FIRST_USE = (
    "INSERT INTO {ks}.once_only (kind, digest, expires_at_ms, claimant) VALUES (?, ?, ?, ?)"
    " IF NOT EXISTS USING TTL ?"
)
_ONCE = "SELECT expires_at_ms, claimant FROM {ks}.once_only WHERE kind = ? AND digest = ?"
_TAKE_OVER = (
    "UPDATE {ks}.once_only USING TTL ? SET expires_at_ms = ?, claimant = ?"
    " WHERE kind = ? AND digest = ? IF claimant = ?"
)


class CassandraOnceOnly:
    """OnceOnly on the ``once_only`` table: ``INSERT ... IF NOT EXISTS USING TTL``."""

    def __init__(self, session: CassandraSession) -> None:
        self._session = session

    async def first_use(self, kind: str, digest: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """True the first time ``(kind, digest)`` is seen before it expires.

        An entry whose ``expires_at_ms`` has passed by ``now_ms`` (TTLs count whole
        seconds, so it may still be stored) is taken over by a conditional update.
        """
        claimant = os.urandom(CLAIMANT_BYTES)
        ttl = _ttl(expires_at_ms, now_ms)
        op = f"record a once-only {kind}"
        for round_ in range(MAX_ROUNDS):
            inserted = await _lwt(
                self._session, _FIRST_USE, (kind, digest, expires_at_ms, claimant, ttl), op
            )
            if inserted:
                return True
            if inserted is None:  # unknown: the next round completes it and tells
                await _backoff(round_)
                continue
            rows = await self._session.execute(_ONCE, (kind, digest), op=op)
            if not rows or rows[0][1] is None:
                continue  # its TTL ran out just now: insert again
            held_until, holder = int(rows[0][0]), bytes(rows[0][1])
            if holder == claimant:
                return True  # an earlier round of ours applied after all
            if held_until > now_ms:
                return False
            taken = await _lwt(
                self._session,
                _TAKE_OVER,
                (ttl, expires_at_ms, claimant, kind, digest, holder),
                op,
            )
            if taken:
                return True
            await _backoff(round_)
        raise Unavailable(f"{op}: gave up after {MAX_ROUNDS} contended rounds")
