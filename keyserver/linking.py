"""Linking: a new device joins an existing user only with the approval of one of its devices.

1. The new device asks (``request``): its identity keys, a signed prekey, a last-resort
   PQ prekey and a *link key* (X25519) it will receive the account key on. Anyone may
   ask; at most ``max_pending_links_per_user`` requests wait per user, each for
   ``link_ttl_ms``. The new device shows a short code derived from what it sent
   (relay/sdk/linking.py), so the person can check on the old device that the request
   it approves is the one on the new device's screen, not a stranger's.
2. A device of the user lists the requests (``pending``), picks the one whose code
   matches, and approves it with the next signed device list (the current one plus
   the new device) and the account key sealed to the link key. The directory checks
   the list like any other, registers the device and keeps the sealed key for it.
3. The new device polls ``complete`` with its request id until it is approved.

The key directory only ever carries the sealed account key; it cannot open it.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from keyserver import lists, validation
from keyserver.model import (
    LinkApproval,
    LinkRequestInput,
    NewDevice,
    PendingLink,
)
from keyserver.ports import KeyStores
from relay import authproof
from relay.accounts import DeviceList, same_devices
from relay.clock import Clock
from relay.errors import (
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
)
from relay.model import Address

if TYPE_CHECKING:
    from keyserver.directory import DirectoryLimits

log = logging.getLogger(__name__)

REQUEST_ID_BYTES = 16
#: A sealed account key: ephemeral X25519 key, nonce, 32-byte key and tag, plus room.
MAX_SEALED_BYTES = 1024
MIN_SEALED_BYTES = 32 + 12 + 32 + 16


class Linking:
    """The link-request steps of the key directory core (see the module docstring)."""

    def __init__(self, stores: KeyStores, clock: Clock, limits: DirectoryLimits) -> None:
        self._stores = stores
        self._clock = clock
        self._limits = limits

    async def request(self, inp: LinkRequestInput) -> PendingLink:
        """Record a new device's request to join ``inp.user``; return it (with its id).

        InvalidArgument for a bad key or signature (named), NotFound if the user has no
        account, AlreadyExists-like FailedPrecondition if the identity key is one of the
        user's devices already, LimitExceeded past ``max_pending_links_per_user``.
        """
        Address(inp.tenant, inp.user, 1).validate(field="request")
        validation.check_new_identity(
            inp.identity_key, inp.identity_dh_key, inp.identity_dh_signature, inp.proof
        )
        validation.check_length("link_key", inp.link_key, validation.KEY_BYTES)
        transcript = authproof.link_request_transcript(
            inp.tenant, inp.user, inp.identity_key, inp.identity_dh_key, inp.link_key
        )
        if not authproof.verify(inp.identity_key, inp.proof, transcript):
            raise InvalidArgument("proof does not verify with identity_key")
        if inp.signed_prekey is None:
            raise InvalidArgument("signed_prekey is required")
        if inp.last_resort_pq_prekey is None:
            raise InvalidArgument("last_resort_pq_prekey is required")
        validation.check_signed_prekey("signed_prekey", inp.signed_prekey, inp.identity_key)
        validation.check_pq_prekey(
            "last_resort_pq_prekey", inp.last_resort_pq_prekey, inp.identity_key
        )
        state = await self._stores.accounts.account(inp.tenant, inp.user)
        if state.device_list is None:
            raise NotFound(
                f"user {inp.tenant}/{inp.user} has no account to join: create it with "
                f"`relayctl init {inp.user}`"
            )
        if await self._stores.devices.find_identity(inp.tenant, inp.user, inp.identity_key):
            raise FailedPrecondition(
                f"identity_key is a device of {inp.tenant}/{inp.user} already (or was): link "
                "with a new identity"
            )
        now = self._clock.now_ms()
        link = PendingLink(
            request_id=secrets.token_bytes(REQUEST_ID_BYTES),
            tenant=inp.tenant,
            user=inp.user,
            identity_key=inp.identity_key,
            identity_dh_key=inp.identity_dh_key,
            identity_dh_signature=inp.identity_dh_signature,
            signed_prekey=inp.signed_prekey,
            last_resort_pq_prekey=inp.last_resort_pq_prekey,
            link_key=inp.link_key,
            created_at_ms=now,
            expires_at_ms=now + self._limits.link_ttl_ms,
        )
        limit = self._limits.max_pending_links_per_user
        if not await self._stores.links.add(link, limit, now):
            raise LimitExceeded(
                "max_pending_links_per_user",
                limit,
                f"user {inp.tenant}/{inp.user} has {limit} link requests waiting already "
                f"(max_pending_links_per_user = {limit}); approve them or wait until they "
                f"expire ({self._limits.link_ttl_ms / 60_000:g} minutes after they were made)",
            )
        log.info("link request for %s/%s waits for approval", inp.tenant, inp.user)
        return link

    async def pending(self, caller: Address) -> tuple[tuple[PendingLink, ...], DeviceList, int]:
        """The caller's user's waiting requests, its current list and next device number."""
        state = await self._stores.accounts.account(caller.tenant, caller.user)
        if state.device_list is None:
            raise FailedPrecondition(f"user {caller.tenant}/{caller.user} has no account")
        links = await self._stores.links.pending(caller.tenant, caller.user, self._clock.now_ms())
        return links, state.device_list, state.last_device + 1

    async def approve(
        self, caller: Address, request_id: bytes, device_list: DeviceList, sealed: bytes
    ) -> Address:
        """Approve request ``request_id`` of the caller's user; return the new address.

        ``device_list`` must be the current list plus the request's device as device
        ``last_device + 1``, signed by the account key, version above the current;
        ``sealed`` the account key sealed to the request's link key. Retrying an approval
        that went through returns the same address.
        """
        if len(request_id) != REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id must be {REQUEST_ID_BYTES} bytes")
        if not MIN_SEALED_BYTES <= len(sealed) <= MAX_SEALED_BYTES:
            raise InvalidArgument(
                f"sealed_account must be {MIN_SEALED_BYTES}..{MAX_SEALED_BYTES} bytes, "
                f"got {len(sealed)}"
            )
        now = self._clock.now_ms()
        link = await self._stores.links.get(request_id, now)
        if link is None or (link.tenant, link.user) != (caller.tenant, caller.user):
            raise NotFound(
                "no such link request for this user (it expired, or the code is for another "
                "user): start `relayctl link` again on the new device"
            )
        if link.approval is not None:
            if link.approval.device_list.signature == device_list.signature:
                return Address(link.tenant, link.user, link.approval.device)
            raise FailedPrecondition("this link request was approved already")
        state = await self._stores.accounts.account(link.tenant, link.user)
        current = lists.check_next(state, device_list, link.tenant, link.user)
        number = state.last_device + 1
        new = device_list.find(number)
        others = tuple(d for d in device_list.devices if d.device != number)
        if new is None or new.identity_key != link.identity_key:
            raise FailedPrecondition(
                f"device_list must add the requesting device as device {number}",
                metadata={"next_device": str(number)},
            )
        if not same_devices(others, current.devices):
            raise FailedPrecondition(
                f"device_list must keep the current list (version {current.version}) as it "
                "is and add one device: fetch the list again"
            )
        limit = self._limits.max_devices_per_user
        if len(device_list.devices) > limit:
            raise LimitExceeded(
                "max_devices_per_user",
                limit,
                f"user {link.tenant}/{link.user} has {len(current.devices)} devices; "
                f"max_devices_per_user = {limit}: remove one first",
            )
        if await self._stores.devices.find_identity(link.tenant, link.user, link.identity_key):
            raise FailedPrecondition(
                "the requesting identity key is a device of this user already (or was): the new "
                "device must link again with a new identity"
            )
        device = NewDevice(link.identity_key, link.identity_dh_key, link.identity_dh_signature, now)
        if not await self._stores.accounts.add_device(
            device_list, device, expected=current.version
        ):
            raise FailedPrecondition(
                f"the device list of {link.tenant}/{link.user} changed meanwhile: fetch it again"
            )
        address = Address(link.tenant, link.user, number)
        await self._stores.prekeys.set_signed_prekey(address, link.signed_prekey)
        await self._stores.pq_prekeys.set_last_resort_pq_prekey(address, link.last_resort_pq_prekey)
        await self._stores.links.approve(request_id, LinkApproval(number, sealed, device_list), now)
        log.info("device %s linked, approved by %s", address, caller)
        return address

    async def complete(self, request_id: bytes) -> PendingLink:
        """The request ``request_id``: waiting, or approved with the sealed account key.

        The id is the capability: it is known only to the new device (and to the user's
        devices, which list it). NotFound once it expired.
        """
        if len(request_id) != REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id must be {REQUEST_ID_BYTES} bytes")
        link = await self._stores.links.get(request_id, self._clock.now_ms())
        if link is None:
            raise NotFound(
                "link request not found: it expired before it was approved; run "
                "`relayctl link` again"
            )
        return link
