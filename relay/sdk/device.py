"""Provision a device and keep its prekeys stocked on the key directory.

Private keys are always stored before their public halves leave the device, and a key
generated but not yet acknowledged by the key directory is marked ``unpublished`` in the
state file, so an upload cut short by a crash or an outage is simply sent again (the
directory adds keys idempotently by key_id) rather than replaced by fresh ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import NamedTuple

from relay.accounts import ListedDevice, build_list
from relay.clock import SystemClock
from relay.errors import FailedPrecondition, RelayError
from relay.model import Address
from relay.sdk.accounts import Accounts, account_public, generate_account_key, next_list, sign_list
from relay.sdk.crypto import primitives
from relay.sdk.crypto.bundle import OneTimePrekey, PqPrekey, SignedPrekey
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.directory import KeyDirectoryClient, PrekeyStatus
from relay.sdk.keys import Identity
from relay.sdk.state import DeviceState

log = logging.getLogger(__name__)

#: Target size of the one-time X25519 pool (uploaded at registration, refilled to).
DEFAULT_ONE_TIME_PREKEYS = 100
#: Target size of the one-time ML-KEM-1024 pool.
DEFAULT_ONE_TIME_PQ_PREKEYS = 100
#: Keys of one pool per request (the key directory's default per-request limits).
MAX_KEYS_PER_REQUEST = 100


async def register_device(
    state: DeviceState,
    directory: KeyDirectoryClient,
    tenant: str,
    user: str,
    *,
    one_time_prekeys: int = DEFAULT_ONE_TIME_PREKEYS,
    one_time_pq_prekeys: int = DEFAULT_ONE_TIME_PQ_PREKEYS,
    registration_token: str = "",
    reset: bool = False,
) -> Address:
    """Give the device in ``state`` keys and create the account of ``user`` with it.

    The device makes the user's account key (kept in ``state``) and signs the first
    device list, naming itself. ``registration_token`` is for a tenant whose policy is
    ``token``; ``reset`` replaces an existing account (removing its devices; needs a
    reset token). A user that exists already raises AlreadyExists: link the device
    with :func:`relay.sdk.linking.request_link` instead.

    Generates the identity and a full :class:`DevicePrekeys` (signed prekey, last-resort
    PQ prekey, ``one_time_prekeys`` X25519 and ``one_time_pq_prekeys`` ML-KEM-1024
    one-time prekeys) and stores them before registering, so a crash in between never
    leaves a registered device without its keys. If the state already has an identity
    but no address (an earlier registration failed), that identity and its stored keys
    are registered. Keys beyond what one request carries are published right after (if
    that fails, the device is registered all the same and ``replenish_prekeys`` sends
    them later).
    Returns the address, which is stored too. Raises FileExistsError if the state is
    registered.
    """
    if state.address() is not None:
        raise FileExistsError(f"{state.path} is already registered as {state.address()}")
    keys = await asyncio.to_thread(_prepare, state, one_time_prekeys, one_time_pq_prekeys)
    identity = keys.identity
    account = state.account_key()
    if account is None:
        account = generate_account_key()
        state.save_account_key(account)
    number, version = 1, 1
    for _ in range(3):  # a reset learns the next device number and version from the refusal
        unsigned = build_list(
            tenant,
            user,
            version,
            SystemClock().now_ms(),
            [ListedDevice.of(number, identity.public_key)],
            account_key=account_public(account),
        )
        device_list = sign_list(account, unsigned)
        try:
            address = await directory.register(
                identity,
                tenant,
                user,
                signed_prekey=keys.signed_prekey,
                one_time=keys.one_time,
                last_resort_pq=keys.last_resort_pq,
                one_time_pq=keys.one_time_pq,
                device_list=device_list,
                registration_token=registration_token,
                reset=reset,
            )
            break
        except FailedPrecondition as exc:
            hints = exc.metadata
            if not {"next_device", "min_version"} & hints.keys():
                raise
            number = int(hints.get("next_device", number))
            version = int(hints.get("min_version", version))
    else:
        raise FailedPrecondition(f"could not register {tenant}/{user}: the account kept changing")
    state.save_address(address)
    state.pin_account(
        tenant, user, device_list.account_key, device_list.version, device_list.devices
    )
    directory.sign_as(identity, address)
    sent = [k.key_id for k in keys.one_time] + [k.key_id for k in keys.one_time_pq]
    state.mark_prekeys_published(sent)
    if state.unpublished_prekey_ids():
        try:
            await _upload_unpublished(state, directory, identity, address)
        except RelayError as exc:  # registered all the same: replenish_prekeys sends them
            log.warning("registered %s; uploading its other prekeys failed: %s", address, exc)
    return address


class _RegistrationKeys(NamedTuple):
    """The public keys a registration request carries."""

    identity: Identity
    signed_prekey: SignedPrekey
    one_time: list[OneTimePrekey]
    last_resort_pq: PqPrekey
    one_time_pq: list[PqPrekey]


def _prepare(state: DeviceState, one_time_ec: int, one_time_pq: int) -> _RegistrationKeys:
    """The keys to register with: stored ones if any, else new ones, stored first.

    Keys beyond the first request's worth of each pool are marked unpublished: they are
    uploaded right after registering.
    """
    with state.transaction():
        identity = state.identity()
        if identity is None:
            identity = Identity.generate()
            state.save_identity(identity)
        prekeys = state.device_prekeys()
        if prekeys is None:
            prekeys = DevicePrekeys.generate(identity, one_time_ec, one_time_pq)
        elif prekeys.last_resort and prekeys.signed:
            prekeys = None  # stored and marked by an earlier attempt
        else:  # keys of a state file from before PQXDH: complete them first
            _add_signed_keys(prekeys, signed=not prekeys.signed, last_resort=True)
        if prekeys is not None:
            later = [
                *sorted(prekeys.one_time_ec)[MAX_KEYS_PER_REQUEST:],
                *sorted(prekeys.one_time_pq)[MAX_KEYS_PER_REQUEST:],
            ]
            state.save_device_prekeys(prekeys, unpublished=later)
        prekeys = state.device_prekeys()
    assert prekeys is not None
    return _RegistrationKeys(
        identity,
        prekeys.signed_prekey(max(prekeys.signed)),
        _one_time(prekeys, sorted(prekeys.one_time_ec)[:MAX_KEYS_PER_REQUEST]),
        prekeys.pq_prekey(max(prekeys.last_resort)),
        [prekeys.pq_prekey(i) for i in sorted(prekeys.one_time_pq)[:MAX_KEYS_PER_REQUEST]],
    )


async def replenish_prekeys(
    state: DeviceState,
    directory: KeyDirectoryClient,
    status: PrekeyStatus | None = None,
    *,
    one_time_prekeys: int = DEFAULT_ONE_TIME_PREKEYS,
    one_time_pq_prekeys: int = DEFAULT_ONE_TIME_PQ_PREKEYS,
) -> PrekeyStatus:
    """Refill this device's prekeys on the key directory if it asks for it; return the status.

    ``status`` is the directory's last answer (fetched when None). If it says
    ``replenish``, one-time X25519 and PQ keys are generated to bring each pool back to
    ``one_time_prekeys`` / ``one_time_pq_prekeys``, plus a last-resort PQ prekey if the
    directory has none; the private keys are saved (marked unpublished) before anything
    is uploaded. Keys left unpublished by an earlier call that failed are uploaded first,
    and no new keys are made while some are unpublished, so calling this often (at every
    session start, after every prekey message) costs one status request when the pools
    are full. Raises FailedPrecondition if the device is not registered.
    """
    address, identity = state.address(), state.identity()
    if address is None or identity is None:
        raise FailedPrecondition(f"{state.path} holds no registered device")
    directory.sign_as(identity, address)
    if state.unpublished_prekey_ids():
        status = await _upload_unpublished(state, directory, identity, address)
    if status is None:
        status = await directory.prekey_status(identity, address)
    if not status.replenish:
        return status
    targets = (one_time_prekeys, one_time_pq_prekeys)
    if await asyncio.to_thread(_generate, state, status, *targets):
        return await _upload_unpublished(state, directory, identity, address) or status
    return status


def _generate(state: DeviceState, status: PrekeyStatus, ec_target: int, pq_target: int) -> bool:
    """Add and save (unpublished) the keys ``status`` lacks; False if there was nothing to do."""
    with state.transaction():  # no consume of a key can slip between load and save
        if state.unpublished_prekey_ids():
            return True  # a concurrent call made keys already: upload those
        prekeys = state.device_prekeys()
        if prekeys is None:
            raise FailedPrecondition(f"{state.path} holds no prekeys: register the device")
        before = _all_ids(prekeys)
        ec = max(0, ec_target - status.one_time_prekeys)
        pq = max(0, pq_target - status.one_time_pq_prekeys)
        prekeys.add_one_time(ec, pq)
        if not status.has_last_resort_pq_prekey and not prekeys.last_resort:
            _add_signed_keys(prekeys, signed=False, last_resort=True)
        new = _all_ids(prekeys) - before
        if not status.has_last_resort_pq_prekey:
            new.add(max(prekeys.last_resort))  # ours, if the directory lost it: send again
        if not new:
            return False
        state.save_device_prekeys(prekeys, unpublished=new)
        return True


async def _upload_unpublished(
    state: DeviceState, directory: KeyDirectoryClient, identity: Identity, address: Address
) -> PrekeyStatus | None:
    """Upload every unpublished key (chunked by request limits); mark them published."""
    found = await asyncio.to_thread(_unpublished, state)
    if found is None:
        return None
    ids, ec, pq, last_resort = found
    status = None
    rounds = max(1, -(-len(ec) // MAX_KEYS_PER_REQUEST), -(-len(pq) // MAX_KEYS_PER_REQUEST))
    for n in range(rounds):
        chunk = slice(n * MAX_KEYS_PER_REQUEST, (n + 1) * MAX_KEYS_PER_REQUEST)
        extra = last_resort if n == 0 else None
        status = await directory.publish_prekeys(
            identity, address, one_time=ec[chunk], one_time_pq=pq[chunk], last_resort_pq=extra
        )
        sent = [k.key_id for k in (*ec[chunk], *pq[chunk], *((extra,) if extra else ()))]
        await asyncio.to_thread(state.mark_prekeys_published, sent)
    # Keys consumed meanwhile are no longer stored; nothing else is left unpublished.
    await asyncio.to_thread(state.mark_prekeys_published, ids)
    return status


_Unpublished = tuple[set[int], list[OneTimePrekey], list[PqPrekey], PqPrekey | None]


def _unpublished(state: DeviceState) -> _Unpublished | None:
    """The unpublished keys in their published form (derived and signed here, off the loop)."""
    with state.transaction():
        prekeys, ids = state.device_prekeys(), state.unpublished_prekey_ids()
    if prekeys is None or not ids:
        return None
    ec = _one_time(prekeys, [i for i in sorted(ids) if i in prekeys.one_time_ec])
    pq = [prekeys.pq_prekey(i) for i in sorted(ids) if i in prekeys.one_time_pq]
    last_resort = [i for i in ids if i in prekeys.last_resort]
    return ids, ec, pq, prekeys.pq_prekey(max(last_resort)) if last_resort else None


def _one_time(prekeys: DevicePrekeys, key_ids: Sequence[int]) -> list[OneTimePrekey]:
    return [
        OneTimePrekey(i, primitives.x25519_public(prekeys.one_time_private(i))) for i in key_ids
    ]


def _add_signed_keys(prekeys: DevicePrekeys, *, signed: bool, last_resort: bool) -> None:
    """Give ``prekeys`` a new signed X25519 and/or last-resort ML-KEM prekey."""
    if signed:
        prekeys.signed[_take_id(prekeys)] = primitives.x25519_generate()
    if last_resort:
        prekeys.last_resort[_take_id(prekeys)] = primitives.mlkem_generate()


def _take_id(prekeys: DevicePrekeys) -> int:
    key_id = prekeys.next_id
    prekeys.next_id += 1
    return key_id


def _all_ids(prekeys: DevicePrekeys) -> set[int]:
    return {
        *prekeys.signed,
        *prekeys.last_resort,
        *prekeys.one_time_ec,
        *prekeys.one_time_pq,
    }


async def remove_device(state: DeviceState, directory: KeyDirectoryClient, number: int) -> Address:
    """Remove device ``number`` of this device's user (itself, or a lost one).

    Signs the user's next device list without it with the account key this device
    holds, after checking the current list. Returns the removed address.
    """
    address, identity = state.address(), state.identity()
    if address is None or identity is None:
        raise FailedPrecondition(f"{state.path} holds no registered device")
    directory.sign_as(identity, address)
    accounts = Accounts(state)
    private = accounts.own_private()
    current = accounts.check(await directory.device_list(address.tenant, address.user))
    target = Address(address.tenant, address.user, number)
    if current.find(number) is None:
        raise FailedPrecondition(f"device {target} is not in the user's device list")
    new = next_list(private, current, SystemClock().now_ms(), remove=[number])
    await directory.remove_device(identity, address, target, new)
    accounts.check(new)
    return target
