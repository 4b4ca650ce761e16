"""The key directory core: it validates, verifies signatures, enforces limits, decides.

Storage sits behind ``keyserver.ports``; time comes from an injected Clock. This module
imports no grpc or protobuf module (a test checks it), so every error is one of
``relay.errors`` and the servicer turns it into a gRPC status.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from keyserver import validation
from keyserver.model import (
    DeviceRecord,
    OneTimePrekey,
    PqPrekey,
    PrekeyBundle,
    PrekeyStatus,
    Registration,
    SignedPrekey,
)
from keyserver.ports import KeyStores
from keyserver.replay import ReplayCache
from relay import authproof
from relay.clock import Clock
from relay.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from relay.model import MAX_DEVICE, Address

log = logging.getLogger(__name__)

DEFAULT_MAX_ONE_TIME_PREKEYS_PER_REQUEST = 100
DEFAULT_MAX_ONE_TIME_PREKEYS = 1000
DEFAULT_MAX_ONE_TIME_PQ_PREKEYS_PER_REQUEST = 100
DEFAULT_MAX_ONE_TIME_PQ_PREKEYS = 1000
#: Default of ``keyserver.low_water_mark`` (relay.config).
DEFAULT_LOW_WATER_MARK = 10
DEFAULT_REQUEST_WINDOW_MS = 60_000
DEFAULT_REPLAY_CACHE_ENTRIES = 100_000
#: Up to this many PQ prekeys are checked on the event loop, more in a worker thread.
_PQ_CHECKS_ON_LOOP = 4


@dataclass(frozen=True, slots=True)
class DirectoryLimits:
    """Limits of the key directory; each is named in the error it causes."""

    max_one_time_prekeys_per_request: int = DEFAULT_MAX_ONE_TIME_PREKEYS_PER_REQUEST
    max_one_time_prekeys: int = DEFAULT_MAX_ONE_TIME_PREKEYS
    max_one_time_pq_prekeys_per_request: int = DEFAULT_MAX_ONE_TIME_PQ_PREKEYS_PER_REQUEST
    max_one_time_pq_prekeys: int = DEFAULT_MAX_ONE_TIME_PQ_PREKEYS
    #: A pool at or below this many keys asks its device to replenish (PrekeyStatus).
    low_water_mark: int = DEFAULT_LOW_WATER_MARK
    #: A signed request's time may differ from the server's by at most this much.
    request_window_ms: int = DEFAULT_REQUEST_WINDOW_MS
    #: Signed requests remembered at once for replay detection.
    replay_cache_entries: int = DEFAULT_REPLAY_CACHE_ENTRIES


class KeyDirectory:
    """Devices, identity keys and prekeys, over the stores of ``keyserver.ports``."""

    def __init__(
        self,
        stores: KeyStores,
        clock: Clock,
        limits: DirectoryLimits | None = None,
    ) -> None:
        self._devices = stores.devices
        self._prekeys = stores.prekeys
        self._pq_prekeys = stores.pq_prekeys
        self._handout = stores.handout
        self._clock = clock
        self._limits = limits or DirectoryLimits()
        self._replays = ReplayCache(self._limits.replay_cache_entries)

    async def register(self, registration: Registration) -> DeviceRecord:
        """Register a new device after checking every key and signature in ``registration``.

        Every signature is verified before anything is stored; a bad one is
        InvalidArgument naming the key. Retrying a registration with the same identity key
        returns the device registered the first time (stores its signed and last-resort PQ
        prekeys only if it has none, adds one-time prekeys idempotently); the same identity
        key with another identity_dh_key is AlreadyExists, and the identity key of a
        removed device is FailedPrecondition (register with a new identity).
        """
        reg = registration
        Address(reg.tenant, reg.user, 1).validate(field="request")
        validation.check_identity_key("identity_key", reg.identity_key)
        validation.check_length("identity_dh_key", reg.identity_dh_key, validation.KEY_BYTES)
        validation.check_length(
            "identity_dh_signature", reg.identity_dh_signature, validation.SIGNATURE_BYTES
        )
        validation.check_length("proof", reg.proof, validation.SIGNATURE_BYTES)
        if reg.signed_prekey is None:
            raise InvalidArgument("signed_prekey is required")
        if reg.last_resort_pq_prekey is None:
            raise InvalidArgument("last_resort_pq_prekey is required")
        validation.check_one_time_prekeys(
            "one_time_prekeys", reg.one_time_prekeys, self._limits.max_one_time_prekeys_per_request
        )
        transcript = authproof.registration_transcript(
            reg.tenant, reg.user, reg.identity_key, reg.identity_dh_key
        )
        if not authproof.verify(reg.identity_key, reg.proof, transcript):
            raise InvalidArgument("proof does not verify with identity_key")
        dh_transcript = authproof.identity_dh_transcript(reg.identity_dh_key)
        if not authproof.verify(reg.identity_key, reg.identity_dh_signature, dh_transcript):
            raise InvalidArgument("identity_dh_signature does not verify with identity_key")
        validation.check_signed_prekey("signed_prekey", reg.signed_prekey, reg.identity_key)
        validation.check_pq_prekey(
            "last_resort_pq_prekey", reg.last_resort_pq_prekey, reg.identity_key
        )
        await self._check_pq_prekeys(reg.one_time_pq_prekeys, reg.identity_key)

        record = await self._devices.register(
            reg.tenant,
            reg.user,
            identity_key=reg.identity_key,
            identity_dh_key=reg.identity_dh_key,
            identity_dh_signature=reg.identity_dh_signature,
            registered_at_ms=self._clock.now_ms(),
        )
        if record.removed_at_ms is not None:
            raise FailedPrecondition(
                f"identity_key belonged to device {record.address}, which was removed; "
                "register with a new identity key"
            )
        if record.identity_dh_key != reg.identity_dh_key:
            raise AlreadyExists(
                f"identity_key is already registered as device {record.address} "
                "with another identity_dh_key"
            )
        # Only when missing: a replayed registration must not roll back a rotated key.
        if await self._prekeys.signed_prekey(record.address) is None:
            await self._prekeys.set_signed_prekey(record.address, reg.signed_prekey)
        if await self._pq_prekeys.last_resort_pq_prekey(record.address) is None:
            await self._pq_prekeys.set_last_resort_pq_prekey(
                record.address, reg.last_resort_pq_prekey
            )
        await self._add_one_time_prekeys(record.address, reg.one_time_prekeys)
        await self._add_one_time_pq_prekeys(record.address, reg.one_time_pq_prekeys)
        log.info("registered device %s", record.address)
        return record

    async def authenticate(
        self, method: str, address: Address, time_ms: int, body: bytes, signature: bytes
    ) -> Address:
        """Check a device-signed request; return the device it is signed by.

        ``signature`` must be the device's Ed25519 signature over
        ``relay.authproof.request_transcript(method, address, time_ms, body)``; ``time_ms``
        at most ``request_window_ms`` from the clock; and the same request not accepted
        before. Any failure is Unauthenticated with a message saying which check failed.
        """
        try:
            address.validate(field="signing device")
        except InvalidArgument as exc:
            raise Unauthenticated(exc.message) from exc
        now = self._clock.now_ms()
        window = self._limits.request_window_ms
        if abs(time_ms - now) > window:
            raise Unauthenticated(
                f"request time {time_ms} is {abs(time_ms - now)} ms from the server's time "
                f"(at most {window} ms allowed): check the device clock"
            )
        record = await self._devices.get(address)
        if record is None:
            raise Unauthenticated(f"signing device {address} is not registered")
        transcript = authproof.request_transcript(method, address, time_ms, body)
        if not authproof.verify(record.identity_key, signature, transcript):
            raise Unauthenticated(
                f"request signature does not verify with the identity key of {address}"
            )
        # Keyed by the transcript, not the signature bytes, so a re-encoded signature
        # of the same request is still a replay.
        digest = hashlib.sha256(transcript).digest()
        self._replays.remember(digest, time_ms + window, now)
        return address

    async def publish_prekeys(
        self,
        caller: Address,
        device: Address,
        signed_prekey: SignedPrekey | None,
        one_time_prekeys: Sequence[OneTimePrekey],
        *,
        last_resort_pq_prekey: PqPrekey | None = None,
        one_time_pq_prekeys: Sequence[PqPrekey] = (),
    ) -> PrekeyStatus:
        """Rotate the signed or last-resort PQ prekey and/or add one-time prekeys of ``device``.

        ``caller`` is the device that signed the request (see ``authenticate``); it may
        publish only for itself. Every key and signature is checked before anything is
        stored (InvalidArgument naming the first bad key). One-time keys are added first,
        X25519 then PQ: a request refused for a pool limit (LimitExceeded) replaces no
        signed key, though it may have added its X25519 keys when the PQ pool is the one
        that is full (retrying is safe: adds are idempotent by key_id). Returns the
        device's prekey status afterwards.
        """
        record = await self._own_device(caller, device, "publish prekeys")
        limits = self._limits
        validation.check_one_time_prekeys(
            "one_time_prekeys", one_time_prekeys, limits.max_one_time_prekeys_per_request
        )
        if signed_prekey is not None:
            validation.check_signed_prekey("signed_prekey", signed_prekey, record.identity_key)
        if last_resort_pq_prekey is not None:
            validation.check_pq_prekey(
                "last_resort_pq_prekey", last_resort_pq_prekey, record.identity_key
            )
        await self._check_pq_prekeys(one_time_pq_prekeys, record.identity_key)
        # One-time keys first: if they pass a limit, no signed key is replaced.
        ec_held = pq_held = None
        if one_time_prekeys:
            ec_held = await self._add_one_time_prekeys(device, one_time_prekeys)
        if one_time_pq_prekeys:
            pq_held = await self._add_one_time_pq_prekeys(device, one_time_pq_prekeys)
        if signed_prekey is not None:
            await self._prekeys.set_signed_prekey(device, signed_prekey)
        if last_resort_pq_prekey is not None:
            await self._pq_prekeys.set_last_resort_pq_prekey(device, last_resort_pq_prekey)
        return await self._status(device, ec_held, pq_held)

    async def fetch_bundles(
        self, tenant: str, user: str, devices: Sequence[int]
    ) -> list[PrekeyBundle]:
        """Return a prekey bundle per device of the user (``devices``, or all if empty).

        Claims one one-time X25519 prekey and one one-time PQ prekey per device (the
        last-resort PQ prekey when that pool is empty); see ``PrekeyHandout``. NotFound
        if the user has no device or a named device does not exist or was removed
        (nothing is claimed then).
        """
        Address(tenant, user, 1).validate(field="request")
        seen: set[int] = set()
        for i, number in enumerate(devices):
            if not 1 <= number <= MAX_DEVICE:
                raise InvalidArgument(f"devices[{i}] {number} is out of range 1..{MAX_DEVICE}")
            if number in seen:
                raise InvalidArgument(f"devices[{i}] repeats device {number}")
            seen.add(number)
        records = await self._devices.list(tenant, user)
        if not records:
            raise NotFound(f"user {tenant}/{user} has no registered devices")
        if devices:
            by_number = {r.address.device: r for r in records}
            for number in devices:
                if number not in by_number:
                    raise NotFound(f"device {tenant}/{user}/{number} is not registered")
            records = tuple(by_number[number] for number in devices)
        return list(await asyncio.gather(*(self._bundle(r) for r in records)))

    async def list_devices(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return the registered devices of (tenant, user), ascending; empty if none."""
        Address(tenant, user, 1).validate(field="request")
        return await self._devices.list(tenant, user)

    async def count_one_time_prekeys(self, caller: Address, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` has; only it may ask."""
        await self._own_device(caller, device, "count the one-time prekeys of")
        return await self._prekeys.count_one_time_prekeys(device)

    async def prekey_status(self, caller: Address, device: Address) -> PrekeyStatus:
        """Return how full the one-time pools of ``device`` are; only it may ask."""
        await self._own_device(caller, device, "count the one-time prekeys of")
        return await self._status(device)

    async def remove_device(self, caller: Address, device: Address) -> DeviceRecord:
        """Remove ``device``: the caller itself or another device of the same user.

        ``caller`` is the device that signed the request. PermissionDenied if ``device``
        belongs to another tenant or user (whether it exists or not); NotFound if it is
        not registered or was removed already. Afterwards the device is gone from
        ListDevices, GetIdentityKey and FetchPrekeyBundles, its signed requests are
        refused, and its device number is never given out again. Returns its record.
        """
        device.validate(field="device")
        if (caller.tenant, caller.user) != (device.tenant, device.user):
            raise PermissionDenied(
                f"device {caller} may not remove device {device}: only a device of "
                f"{device.tenant}/{device.user} may"
            )
        record = await self._devices.get(device)
        if record is None or not await self._devices.remove(device, self._clock.now_ms()):
            raise NotFound(f"device {device} is not registered")
        log.info("device %s removed by %s", device, caller)
        return record

    async def identity_key(self, device: Address) -> bytes:
        """Return the Ed25519 identity key of ``device``; NotFound if not registered."""
        device.validate(field="device")
        record = await self._devices.get(device)
        if record is None:
            raise NotFound(f"device {device} is not registered")
        return record.identity_key

    async def _own_device(self, caller: Address, device: Address, action: str) -> DeviceRecord:
        device.validate(field="device")
        if caller != device:
            raise PermissionDenied(f"device {caller} may not {action} device {device}")
        record = await self._devices.get(device)
        if record is None:
            raise NotFound(f"device {device} is not registered")
        return record

    async def _check_pq_prekeys(self, prekeys: Sequence[PqPrekey], identity_key: bytes) -> None:
        """Check ``one_time_pq_prekeys`` (see validation); off the event loop when many.

        A hundred keys take some 15 ms of signature and ML-KEM checks: long enough to
        stall every other call on this loop if run on it.
        """
        limit = self._limits.max_one_time_pq_prekeys_per_request
        args = ("one_time_pq_prekeys", prekeys, identity_key, limit)
        if len(prekeys) <= _PQ_CHECKS_ON_LOOP or len(prekeys) > limit:
            validation.check_one_time_pq_prekeys(*args)
        else:
            await asyncio.to_thread(validation.check_one_time_pq_prekeys, *args)

    async def _status(
        self, device: Address, ec_held: int | None = None, pq_held: int | None = None
    ) -> PrekeyStatus:
        """The prekey status of ``device``; counts already known are passed in."""
        if ec_held is None:
            ec_held = await self._prekeys.count_one_time_prekeys(device)
        if pq_held is None:
            pq_held = await self._pq_prekeys.count_one_time_pq_prekeys(device)
        has_last_resort = await self._pq_prekeys.last_resort_pq_prekey(device) is not None
        mark = self._limits.low_water_mark
        return PrekeyStatus(
            one_time_prekeys=ec_held,
            one_time_pq_prekeys=pq_held,
            low_water_mark=mark,
            replenish=ec_held <= mark or pq_held <= mark or not has_last_resort,
            has_last_resort_pq_prekey=has_last_resort,
        )

    async def _add_one_time_pq_prekeys(self, device: Address, prekeys: Sequence[PqPrekey]) -> int:
        limit = self._limits.max_one_time_pq_prekeys
        added = await self._pq_prekeys.add_one_time_pq_prekeys(device, prekeys, limit)
        if not added.accepted:
            raise LimitExceeded(
                "max_one_time_pq_prekeys",
                limit,
                f"device {device} holds {added.held} one-time PQ prekeys; adding "
                f"{len(prekeys)} would pass max_one_time_pq_prekeys = {limit}",
            )
        return added.held

    async def _add_one_time_prekeys(self, device: Address, prekeys: Sequence[OneTimePrekey]) -> int:
        limit = self._limits.max_one_time_prekeys
        added = await self._prekeys.add_one_time_prekeys(device, prekeys, limit)
        if not added.accepted:
            raise LimitExceeded(
                "max_one_time_prekeys",
                limit,
                f"device {device} holds {added.held} one-time prekeys; adding "
                f"{len(prekeys)} would pass max_one_time_prekeys = {limit}",
            )
        return added.held

    async def _bundle(self, record: DeviceRecord) -> PrekeyBundle:
        keys = await self._handout.claim_bundle_keys(record.address)
        return PrekeyBundle(
            record, keys.signed_prekey, keys.one_time_prekey, keys.pq_prekey, keys.pq_last_resort
        )
