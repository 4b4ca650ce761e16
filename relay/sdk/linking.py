"""Linking a new device to an existing user, approved on a device the user has.

New device (``relayctl --home NEW link bob``)::

    ticket = await request_link(state, directory, "default", "bob")
    print(ticket.code)                       # e.g. "K7QXM-2PAHD": shown to the person
    address = await wait_for_approval(state, directory)

Existing device (``relayctl --home OLD approve K7QXM-2PAHD``)::

    address = await approve_link(state, directory, "K7QXM-2PAHD")

The **code** is a 50-bit digest of everything the new device sent (its identity keys
and its link key), so the person checks on the old device that the request it approves
is the one on the new device's screen; a stranger's request (or one the key directory
made up) has another code, and finding keys that match a given code takes some 2**50
tries in the ten minutes a request lives.

The **account key** travels sealed: X25519 between a fresh key of the approver and the
new device's link key, HKDF-SHA-256 (salt: the request id; info: a label and the
request's transcript), AES-256-GCM with that transcript as associated data. The relay
and the key directory only carry ``ephemeral public key || nonce || ciphertext``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from dataclasses import dataclass

from relay import authproof
from relay.accounts import DeviceList, ListedDevice
from relay.clock import Clock, SystemClock
from relay.errors import FailedPrecondition, NotFound, Unauthenticated
from relay.model import Address
from relay.sdk.accounts import Accounts, account_public, next_list
from relay.sdk.crypto import primitives
from relay.sdk.crypto.errors import CryptoError
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.device import (
    DEFAULT_ONE_TIME_PQ_PREKEYS,
    DEFAULT_ONE_TIME_PREKEYS,
    replenish_prekeys,
)
from relay.sdk.directory import KeyDirectoryClient, LinkRequestInfo
from relay.sdk.keys import Identity
from relay.sdk.state import DeviceState

log = logging.getLogger(__name__)

CODE_LABEL = b"e2ee-relay/link-code/v1"
SEAL_LABEL = b"e2ee-relay/link-seal/v1"
#: Digits of the link code (base32, 5 bits each: 50 bits).
CODE_CHARS = 10
#: How often the new device asks whether it was approved.
DEFAULT_POLL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class LinkTicket:
    """A link request made by this device: the code to show, and when it expires."""

    code: str
    request_id: bytes
    expires_at_ms: int


def link_code(
    tenant: str, user: str, identity_key: bytes, identity_dh_key: bytes, link_key: bytes
) -> str:
    """The short code of a link request (``XXXXX-XXXXX``, base32)."""
    transcript = authproof.link_request_transcript(
        tenant, user, identity_key, identity_dh_key, link_key
    )
    digest = hashlib.sha256(CODE_LABEL + transcript).digest()
    text = base64.b32encode(digest[:10]).decode()[:CODE_CHARS]
    return f"{text[:5]}-{text[5:]}"


def normalize_code(code: str) -> str:
    """``code`` as :func:`link_code` writes it (case, spaces and dashes do not matter)."""
    text = "".join(c for c in code.upper() if c.isalnum())
    return f"{text[:5]}-{text[5:]}" if len(text) == CODE_CHARS else text


def _seal_context(
    request_id: bytes,
    *,
    tenant: str,
    user: str,
    identity_key: bytes,
    identity_dh_key: bytes,
    link_key: bytes,
) -> bytes:
    return (
        SEAL_LABEL
        + request_id
        + authproof.link_request_transcript(tenant, user, identity_key, identity_dh_key, link_key)
    )


def seal_account_key(
    account_private: bytes,
    request_id: bytes,
    *,
    tenant: str,
    user: str,
    identity_key: bytes,
    identity_dh_key: bytes,
    link_key: bytes,
) -> bytes:
    """The account key sealed to a link request's ``link_key`` (see the module docstring)."""
    ephemeral = primitives.x25519_generate()
    shared = primitives.x25519(ephemeral, link_key)
    context = _seal_context(
        request_id,
        tenant=tenant,
        user=user,
        identity_key=identity_key,
        identity_dh_key=identity_dh_key,
        link_key=link_key,
    )
    key = primitives.hkdf_sha256(shared, request_id, context, 32)
    nonce = os.urandom(12)
    sealed = primitives.aead_encrypt(key, nonce, account_private, context)
    return primitives.x25519_public(ephemeral) + nonce + sealed


def open_account_key(
    link_private: bytes,
    sealed: bytes,
    request_id: bytes,
    *,
    tenant: str,
    user: str,
    identity_key: bytes,
    identity_dh_key: bytes,
) -> bytes:
    """Inverse of :func:`seal_account_key`; raises a CryptoError if it is not authentic."""
    if len(sealed) < 32 + 12 + 16:
        raise Unauthenticated("the sealed account key is too short")
    link_key = primitives.x25519_public(link_private)
    shared = primitives.x25519(link_private, sealed[:32])
    context = _seal_context(
        request_id,
        tenant=tenant,
        user=user,
        identity_key=identity_key,
        identity_dh_key=identity_dh_key,
        link_key=link_key,
    )
    key = primitives.hkdf_sha256(shared, request_id, context, 32)
    return primitives.aead_decrypt(key, sealed[32:44], sealed[44:], context)


async def request_link(
    state: DeviceState,
    directory: KeyDirectoryClient,
    tenant: str,
    user: str,
    *,
    one_time_prekeys: int = DEFAULT_ONE_TIME_PREKEYS,
    one_time_pq_prekeys: int = DEFAULT_ONE_TIME_PQ_PREKEYS,
) -> LinkTicket:
    """Make this (unregistered) device's keys and ask to join ``user``; return the ticket.

    The private keys are stored first; the one-time prekeys go up once approved. Raises
    FileExistsError if the state holds a registered device, NotFound if ``user`` has no
    account, LimitExceeded if too many requests wait for the user.
    """
    if state.address() is not None:
        raise FileExistsError(f"{state.path} is already registered as {state.address()}")
    identity, prekeys = await asyncio.to_thread(
        _prepare_keys, state, one_time_prekeys, one_time_pq_prekeys
    )
    link_private = primitives.x25519_generate()
    link_key = primitives.x25519_public(link_private)
    signed_id = max(prekeys.signed)
    request_id, expires = await directory.request_link(
        identity,
        tenant,
        user,
        signed_prekey=prekeys.signed_prekey(signed_id),
        last_resort_pq=prekeys.pq_prekey(max(prekeys.last_resort)),
        link_key=link_key,
    )
    state.save_pending_link(tenant, user, request_id, link_private, expires)
    code = link_code(tenant, user, identity.public_key, identity.dh_public_key, link_key)
    return LinkTicket(code, request_id, expires)


def _prepare_keys(state: DeviceState, ec: int, pq: int) -> tuple[Identity, DevicePrekeys]:
    with state.transaction():
        identity = state.identity()
        if identity is None:
            identity = Identity.generate()
            state.save_identity(identity)
        prekeys = state.device_prekeys()
        if prekeys is None or not prekeys.signed or not prekeys.last_resort:
            prekeys = DevicePrekeys.generate(identity, ec, pq)
            one_time = [*prekeys.one_time_ec, *prekeys.one_time_pq]
            state.save_device_prekeys(prekeys, unpublished=one_time)
    return identity, prekeys


async def wait_for_approval(
    state: DeviceState,
    directory: KeyDirectoryClient,
    *,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    clock: Clock | None = None,
) -> Address:
    """Wait until a device of the user approves this device's link request; return its address.

    Then the account key is opened and checked against the signed list (which must name
    this device), stored with the address, and the one-time prekeys are uploaded.
    Raises NotFound when the request expired, FailedPrecondition if there is none.
    """
    clock = clock or SystemClock()
    pending = state.pending_link()
    identity = state.identity()
    if pending is None or identity is None:
        raise FailedPrecondition(f"{state.path} has no link request: run `relayctl link USER`")
    while True:
        result = await directory.complete_link(pending.request_id)
        if result.approved:
            break
        if clock.now_ms() >= pending.expires_at_ms:
            raise NotFound("the link request expired before it was approved: link again")
        await asyncio.sleep(poll_seconds)  # polling the directory, not synchronisation
    assert result.address is not None and result.device_list is not None
    address, device_list = result.address, result.device_list
    try:
        account = open_account_key(
            pending.link_private,
            result.sealed_account,
            pending.request_id,
            tenant=pending.tenant,
            user=pending.user,
            identity_key=identity.public_key,
            identity_dh_key=identity.dh_public_key,
        )
    except CryptoError as exc:
        raise Unauthenticated(f"the sealed account key does not open: {exc.message}") from exc
    _check_approved_list(device_list, account, address, identity)
    with state.transaction():
        state.save_account_key(account)
        state.save_address(address)
        state.pin_account(
            address.tenant,
            address.user,
            device_list.account_key,
            device_list.version,
            device_list.devices,
        )
        state.clear_pending_link()
    await replenish_prekeys(state, directory)
    log.info("linked as %s", address)
    return address


def _check_approved_list(
    device_list: DeviceList, account: bytes, address: Address, identity: Identity
) -> None:
    if device_list.account_key != account_public(account) or not device_list.verifies():
        raise Unauthenticated("the approved device list is not signed by the account key received")
    entry = device_list.find(address.device)
    if entry is None or entry.identity_key != identity.public_key:
        raise Unauthenticated(f"the approved device list does not name this device as {address}")


async def approve_link(
    state: DeviceState, directory: KeyDirectoryClient, code: str, *, clock: Clock | None = None
) -> Address:
    """Approve the waiting link request whose code is ``code``; return the new address.

    Checks the user's current list with the account key, signs the next one with the
    new device in it, and seals the account key to the request's link key. Raises
    NotFound if no waiting request has that code.
    """
    clock = clock or SystemClock()
    address, identity = state.address(), state.identity()
    if address is None or identity is None:
        raise FailedPrecondition(f"{state.path} holds no registered device")
    directory.sign_as(identity, address)
    accounts = Accounts(state)
    private = accounts.own_private()
    waiting = await directory.list_link_requests(identity, address)
    wanted = normalize_code(code)
    match = _find(waiting.requests, wanted, address)
    if match is None:
        raise NotFound(
            f"no link request with code {wanted} waits for {address.tenant}/{address.user}: "
            "check the code on the new device (requests expire: link again if it is old)"
        )
    current = accounts.check(waiting.device_list)
    new_entry = ListedDevice.of(waiting.next_device, match.identity_key)
    new_list = next_list(private, current, clock.now_ms(), add=[new_entry])
    sealed = seal_account_key(
        private,
        match.request_id,
        tenant=address.tenant,
        user=address.user,
        identity_key=match.identity_key,
        identity_dh_key=match.identity_dh_key,
        link_key=match.link_key,
    )
    linked = await directory.approve_link(identity, address, match.request_id, new_list, sealed)
    accounts.check(new_list)
    return linked


def _find(requests: tuple[LinkRequestInfo, ...], code: str, own: Address) -> LinkRequestInfo | None:
    for request in requests:
        theirs = link_code(
            own.tenant, own.user, request.identity_key, request.identity_dh_key, request.link_key
        )
        if theirs == code:
            return request
    return None
