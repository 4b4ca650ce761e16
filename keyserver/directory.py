"""The key directory core: it validates, verifies signatures, enforces limits, decides.

Storage sits behind ``keyserver.ports``; time comes from an injected Clock. This module
imports no grpc or protobuf module (a test checks it), so every error is one of
``relay.errors`` and the servicer turns it into a gRPC status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from keyserver import lists, tokens, validation
from keyserver.linking import Linking
from keyserver.model import (
    AccountState,
    DeviceRecord,
    NewDevice,
    OneTimePrekey,
    PqPrekey,
    PrekeyBundle,
    PrekeyStatus,
    Reader,
    Registration,
    SignedPrekey,
)
from keyserver.ports import DeviceEvents, KeyStores
from keyserver.quotas import Rate, RateLimiter
from relay import authproof
from relay.accounts import DeviceList
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
DEFAULT_MAX_SIGNED_REQUESTS_PER_DEVICE = 600
DEFAULT_MAX_BUNDLE_FETCHES_PER_REQUESTER = 120
DEFAULT_MAX_BUNDLE_FETCHES_PER_TARGET = 10
DEFAULT_MAX_DEVICES_PER_USER = 32
DEFAULT_MAX_PENDING_LINKS_PER_USER = 3
DEFAULT_LINK_TTL_MS = 10 * 60_000
#: Registration policies a tenant can have.
POLICIES = ("open", "token", "closed")
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
    #: Signed requests one device may make per minute (bounds what it can put in the
    #: shared replay store, so no caller can crowd out the others).
    max_signed_requests_per_device: int = DEFAULT_MAX_SIGNED_REQUESTS_PER_DEVICE
    #: Prekey bundles one requester may fetch per minute (all targets together).
    max_bundle_fetches_per_requester: int = DEFAULT_MAX_BUNDLE_FETCHES_PER_REQUESTER
    #: Prekey bundles one requester may fetch of one target device per hour.
    max_bundle_fetches_per_target: int = DEFAULT_MAX_BUNDLE_FETCHES_PER_TARGET
    #: Devices one user may have at once (limits.max_devices_per_user).
    max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER
    #: Link requests waiting for approval per user.
    max_pending_links_per_user: int = DEFAULT_MAX_PENDING_LINKS_PER_USER
    #: How long a link request waits for approval.
    link_ttl_ms: int = DEFAULT_LINK_TTL_MS


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    """Who may claim a new user name in a tenant.

    ``open``: first come, first served. ``token``: only with a registration token
    signed by ``token_key`` (the tenant's backend mints it, see keyserver.tokens).
    ``closed``: nobody (accounts of the tenant are made elsewhere, or not at all).
    """

    mode: str = "open"
    token_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"registration policy {self.mode!r} is not one of {POLICIES}")
        if self.mode == "token" and (self.token_key is None or len(self.token_key) != 32):
            raise ValueError("a token registration policy needs a 32-byte Ed25519 token_key")


@dataclass(frozen=True, slots=True)
class Policies:
    """The registration policy of each tenant; tenants not named get ``default``."""

    default: RegistrationPolicy = RegistrationPolicy()
    tenants: tuple[tuple[str, RegistrationPolicy], ...] = ()

    def of(self, tenant: str) -> RegistrationPolicy:
        """The policy of ``tenant``."""
        for name, policy in self.tenants:
            if name == tenant:
                return policy
        return self.default


class KeyDirectory:
    """Devices, identity keys and prekeys, over the stores of ``keyserver.ports``."""

    def __init__(
        self,
        stores: KeyStores,
        clock: Clock,
        limits: DirectoryLimits | None = None,
        *,
        policies: Policies | None = None,
        bearer_keys: Mapping[bytes, Reader] | None = None,
        events: DeviceEvents | None = None,
    ) -> None:
        self._devices = stores.devices
        self._accounts = stores.accounts
        self._once = stores.once
        self._prekeys = stores.prekeys
        self._pq_prekeys = stores.pq_prekeys
        self._handout = stores.handout
        self._clock = clock
        self._limits = limits = limits or DirectoryLimits()
        self._policies = policies or Policies()
        #: SHA-256 of a bearer key -> who holds it (tenant services, relay nodes).
        self._bearer = dict(bearer_keys or {})
        self._events = events
        #: The link-request steps (new devices joining a user), on the same stores.
        self.linking = Linking(stores, clock, limits)
        self._signed_rate = RateLimiter(
            Rate("max_signed_requests_per_device", limits.max_signed_requests_per_device, 60_000)
        )
        self._fetch_rate = RateLimiter(
            Rate(
                "max_bundle_fetches_per_requester", limits.max_bundle_fetches_per_requester, 60_000
            )
        )
        self._pair_rate = RateLimiter(
            Rate("max_bundle_fetches_per_target", limits.max_bundle_fetches_per_target, 3_600_000)
        )

    @property
    def limits(self) -> DirectoryLimits:
        """The limits this core enforces."""
        return self._limits

    @property
    def clock(self) -> Clock:
        """The core's clock."""
        return self._clock

    async def register(self, registration: Registration) -> DeviceRecord:
        """Create a user's account with its first device, after checking every key.

        Every key and signature is verified before anything is stored; a bad one is
        InvalidArgument naming it. The request carries the new account key and the first
        signed device list (this device alone, numbered 1, or ``last_device + 1`` after a
        reset). A user that exists already is AlreadyExists: a further device joins with
        a link request that an existing device approves. The tenant's registration
        policy decides who may claim a new name (a token policy needs a valid, unexpired,
        unused token for this user). Retrying a registration that went through returns
        the same device (its prekeys are stored only where missing).
        """
        reg = registration
        tenant, user = reg.tenant, reg.user
        Address(tenant, user, 1).validate(field="request")
        validation.check_new_identity(
            reg.identity_key, reg.identity_dh_key, reg.identity_dh_signature, reg.proof
        )
        if reg.signed_prekey is None:
            raise InvalidArgument("signed_prekey is required")
        if reg.last_resort_pq_prekey is None:
            raise InvalidArgument("last_resort_pq_prekey is required")
        validation.check_one_time_prekeys(
            "one_time_prekeys", reg.one_time_prekeys, self._limits.max_one_time_prekeys_per_request
        )
        transcript = authproof.registration_transcript(
            tenant, user, reg.identity_key, reg.identity_dh_key
        )
        if not authproof.verify(reg.identity_key, reg.proof, transcript):
            raise InvalidArgument("proof does not verify with identity_key")
        validation.check_signed_prekey("signed_prekey", reg.signed_prekey, reg.identity_key)
        validation.check_pq_prekey(
            "last_resort_pq_prekey", reg.last_resort_pq_prekey, reg.identity_key
        )
        await self._check_pq_prekeys(reg.one_time_pq_prekeys, reg.identity_key)
        device_list = self._check_first_list(reg)

        state = await self._accounts.account(tenant, user)
        retried = await self._retried_registration(reg, state)
        if retried is not None:
            return await self._store_registration_prekeys(retried, reg)
        # The policy before anything about the user: without a token, a stranger cannot
        # even learn whether a name is taken in a token tenant.
        token = self._check_registration_policy(reg)
        if state.exists and not reg.reset:
            raise AlreadyExists(
                f"user {tenant}/{user} exists already: a new device of it joins with "
                f"`relayctl link {user}` and is approved on a device the user has "
                "(`relayctl approve CODE`)",
                metadata={"tenant": tenant, "user": user},
            )
        if reg.reset and (state.device_list is None):
            raise NotFound(f"user {tenant}/{user} has no account to reset")
        number = state.last_device + 1
        if device_list.numbers() != (number,):
            raise FailedPrecondition(
                f"device_list must name this device as device {number}, the user's next "
                "device number",
                metadata={"next_device": str(number)},
            )
        if state.device_list is not None and device_list.version <= state.device_list.version:
            raise FailedPrecondition(
                f"device_list.version must be above {state.device_list.version}",
                metadata={"min_version": str(state.device_list.version + 1)},
            )
        device = NewDevice(
            reg.identity_key, reg.identity_dh_key, reg.identity_dh_signature, self._clock.now_ms()
        )
        replaces = state.device_list.version if reg.reset and state.device_list else None
        if token is not None and not await self._once.first_use(
            "token", token.token_id, token.expires_at_ms, self._clock.now_ms()
        ):  # spent last, so that a refused registration leaves the token usable
            raise Unauthenticated(
                "registration_token was used before: each token registers one device once; "
                "ask for a new one"
            )
        if not await self._accounts.create(device_list, device, replaces=replaces):
            raise FailedPrecondition(
                f"the account of {tenant}/{user} changed while registering; try again"
            )
        record = await self._devices.get(Address(tenant, user, number))
        if record is None:  # pragma: no cover - the store just wrote it
            raise FailedPrecondition(f"device {tenant}/{user}/{number} vanished; try again")
        if reg.reset and state.device_list is not None:
            for old in state.device_list.addresses():
                await self._announce_removed(old)
        log.info("created account %s/%s with device %s", tenant, user, record.address)
        return await self._store_registration_prekeys(record, reg)

    def _check_first_list(self, reg: Registration) -> DeviceList:
        """The first signed list of a new account: this one device, signed by its key."""
        if len(reg.account_key) != validation.KEY_BYTES:
            raise InvalidArgument(
                f"account_key must be {validation.KEY_BYTES} bytes, got {len(reg.account_key)}: "
                "the first device of a user creates the account key (update the SDK?)"
            )
        if reg.device_list is None:
            raise InvalidArgument("device_list is required: the account's first signed list")
        device_list = reg.device_list.check_shape()
        if (device_list.tenant, device_list.user) != (reg.tenant, reg.user):
            raise InvalidArgument("device_list is for another user than the registration")
        if device_list.account_key != reg.account_key:
            raise InvalidArgument("device_list.account_key is not the account_key registered")
        if not device_list.verifies():
            raise InvalidArgument("device_list.signature does not verify with account_key")
        if len(device_list.devices) != 1 or device_list.devices[0].identity_key != reg.identity_key:
            raise InvalidArgument(
                "device_list must name exactly one device: the one registering (its identity_key)"
            )
        return device_list

    async def _retried_registration(
        self, reg: Registration, state: AccountState
    ) -> DeviceRecord | None:
        """The device a registration made before, if this is a retry of it."""
        # Only the holder of the account key could have made the stored list: if it names
        # this identity key, this is that holder asking again.
        if state.device_list is None or state.account_key != reg.account_key:
            return None
        if not any(d.identity_key == reg.identity_key for d in state.device_list.devices):
            return None
        record = await self._devices.find_identity(reg.tenant, reg.user, reg.identity_key)
        if record is None or record.removed_at_ms is not None:
            return None
        if record.identity_dh_key != reg.identity_dh_key:
            raise AlreadyExists(
                f"identity_key is already registered as device {record.address} "
                "with another identity_dh_key"
            )
        return record

    def _check_registration_policy(self, reg: Registration) -> tokens.RegistrationToken | None:
        """Raise unless the tenant's policy lets ``reg`` through; return its token if any.

        The token is checked here but not spent (the caller spends it last).
        """
        policy = self._policies.of(reg.tenant)
        if policy.mode == "closed":
            raise PermissionDenied(
                f"tenant {reg.tenant!r} does not take new users here (registration policy closed)"
            )
        if policy.mode == "open":
            if reg.reset:
                raise PermissionDenied(
                    f"tenant {reg.tenant!r} has an open registration policy, under which "
                    "nobody can vouch for a reset: an account can be reset only with a reset "
                    "token of a tenant whose policy is token"
                )
            return None
        if not reg.registration_token:
            raise Unauthenticated(
                f"tenant {reg.tenant!r} needs a registration token to create a user: ask the "
                "app's backend for one and pass it with `relayctl init --token T`"
            )
        token = tokens.parse(reg.registration_token)
        assert policy.token_key is not None
        if not token.verifies(policy.token_key):
            raise Unauthenticated(
                f"registration_token is not signed by tenant {reg.tenant!r}'s signing key"
            )
        if (token.tenant, token.user) != (reg.tenant, reg.user):
            raise PermissionDenied(
                f"registration_token was minted for {token.tenant}/{token.user}, "
                f"not {reg.tenant}/{reg.user}"
            )
        wanted = "reset" if reg.reset else "register"
        if token.purpose != wanted:
            raise PermissionDenied(
                f"registration_token is for {token.purpose!r}, this request needs one for "
                f"{wanted!r}"
            )
        now = self._clock.now_ms()
        if token.expires_at_ms <= now:
            raise Unauthenticated(
                f"registration_token expired {(now - token.expires_at_ms) // 1000} s ago: ask "
                "the app's backend for a new one"
            )
        if token.expires_at_ms - now > tokens.MAX_TOKEN_LIFETIME_MS:
            raise InvalidArgument("registration_token lives longer than 24 h: mint a shorter one")
        return token

    async def _store_registration_prekeys(
        self, record: DeviceRecord, reg: Registration
    ) -> DeviceRecord:
        assert reg.signed_prekey is not None and reg.last_resort_pq_prekey is not None
        # Only when missing: a replayed registration must not roll back a rotated key.
        if await self._prekeys.signed_prekey(record.address) is None:
            await self._prekeys.set_signed_prekey(record.address, reg.signed_prekey)
        if await self._pq_prekeys.last_resort_pq_prekey(record.address) is None:
            await self._pq_prekeys.set_last_resort_pq_prekey(
                record.address, reg.last_resort_pq_prekey
            )
        await self._add_one_time_prekeys(record.address, reg.one_time_prekeys)
        await self._add_one_time_pq_prekeys(record.address, reg.one_time_pq_prekeys)
        return record

    async def authenticate(
        self,
        method: str,
        address: Address,
        time_ms: int,
        body: bytes,
        signature: bytes,
        *,
        nonce: bytes = b"",
    ) -> Address:
        """Check a device-signed request; return the device it is signed by.

        ``signature`` must be the device's Ed25519 signature over
        ``relay.authproof.request_transcript(method, address, time_ms, body, nonce)``; ``time_ms``
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
        transcript = authproof.request_transcript(method, address, time_ms, body, nonce)
        if not authproof.verify(record.identity_key, signature, transcript):
            raise Unauthenticated(
                f"request signature does not verify with the identity key of {address}"
            )
        # Checked per device before anything is stored (one device cannot crowd the
        # shared replay store for the others), counted once stored: a replay captured
        # and sent again costs the device no quota.
        self._signed_rate.check(str(address), now, what="signed requests")
        # Keyed by the transcript, not the signature bytes, so a re-encoded signature
        # of the same request is still a replay. Kept until just past the last moment
        # the time check accepts it (time_ms + window inclusive; OnceOnly entries expire
        # at expires_at_ms).
        digest = hashlib.sha256(transcript).digest()
        if not await self._once.first_use("request", digest, time_ms + window + 1, now):
            raise Unauthenticated("replayed request: this signed request was accepted before")
        self._signed_rate.hit(str(address), now, what="signed requests")
        return address

    def authenticate_bearer(self, key: str) -> Reader:
        """The holder of bearer ``key`` (a tenant service or the relay nodes); else raise."""
        if not self._bearer:
            raise Unauthenticated(
                "this key directory has no bearer keys configured: sign the request as a "
                "device instead"
            )
        digest = hashlib.sha256(key.encode()).digest()
        for known, reader in self._bearer.items():
            if hmac.compare_digest(known, digest):
                return reader
        raise Unauthenticated("bearer key not recognised")

    async def device_reader(self, device: Address) -> Reader:
        """A Reader for an authenticated ``device`` (reads of its own tenant)."""
        return Reader(str(device), device.tenant, device)

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
        self, tenant: str, user: str, devices: Sequence[int], *, by: Reader | None = None
    ) -> list[PrekeyBundle]:
        """Return a prekey bundle per device of the user (``devices``, or all if empty).

        Claims one one-time X25519 prekey and one one-time PQ prekey per device (the
        last-resort PQ prekey when that pool is empty); see ``PrekeyHandout``. NotFound
        if the user has no device or a named device does not exist or was removed
        (nothing is claimed then). ``by`` is who asks (the servicer always says; None is
        the core's own use, in tests): a reader of the tenant (else PermissionDenied),
        each bundle counted against ``max_bundle_fetches_per_requester`` and, per target
        device, ``max_bundle_fetches_per_target`` (LimitExceeded, nothing claimed).
        """
        Address(tenant, user, 1).validate(field="request")
        if by is not None:
            self._check_reader(by, tenant, "fetch prekey bundles of")
            if by.relay_node:
                raise PermissionDenied("relay nodes do not fetch prekey bundles")
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
        if by is not None:
            self._count_fetches(by, records)
        return list(await asyncio.gather(*(self._bundle(r) for r in records)))

    def _count_fetches(self, by: Reader, records: Sequence[DeviceRecord]) -> None:
        now = self._clock.now_ms()
        for record in records:  # check every limit before counting any
            self._pair_rate.check(
                f"{by.name}->{record.address}", now, what=f"prekey bundles of {record.address}"
            )
        self._fetch_rate.hit(by.name, now, cost=len(records), what="prekey bundles")
        for record in records:
            self._pair_rate.hit(
                f"{by.name}->{record.address}", now, what=f"prekey bundles of {record.address}"
            )

    def _check_reader(self, reader: Reader | None, tenant: str, action: str) -> None:
        if reader is None:
            return
        if reader.tenant is not None and reader.tenant != tenant:
            raise PermissionDenied(
                f"{reader.name} may not {action} tenant {tenant!r}: only callers of that tenant"
            )

    async def list_devices(
        self, tenant: str, user: str, *, by: Reader | None = None
    ) -> tuple[DeviceRecord, ...]:
        """Return the registered devices of (tenant, user), ascending; empty if none.

        ``by`` must be a reader of the tenant (PermissionDenied); None: the core's own use.
        """
        Address(tenant, user, 1).validate(field="request")
        self._check_reader(by, tenant, "list the devices of")
        return await self._devices.list(tenant, user)

    async def device_list(self, tenant: str, user: str, *, by: Reader | None = None) -> DeviceList:
        """The user's latest device list, signed by its account key; NotFound if none."""
        Address(tenant, user, 1).validate(field="request")
        self._check_reader(by, tenant, "read the device list of")
        state = await self._accounts.account(tenant, user)
        if state.device_list is None:
            raise NotFound(f"unknown user {tenant}/{user}: no account, no registered devices")
        return state.device_list

    async def count_one_time_prekeys(self, caller: Address, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` has; only it may ask."""
        await self._own_device(caller, device, "count the one-time prekeys of")
        return await self._prekeys.count_one_time_prekeys(device)

    async def prekey_status(self, caller: Address, device: Address) -> PrekeyStatus:
        """Return how full the one-time pools of ``device`` are; only it may ask."""
        await self._own_device(caller, device, "count the one-time prekeys of")
        return await self._status(device)

    async def remove_device(
        self, caller: Address, device: Address, device_list: DeviceList | None
    ) -> DeviceRecord:
        """Remove ``device``: the caller itself or another device of the same user.

        ``caller`` is the device that signed the request; ``device_list`` the user's new
        list without ``device``, signed by the account key, version above the current.
        PermissionDenied if ``device`` belongs to another tenant or user (whether it
        exists or not) or the list is not signed by the account key; NotFound if it is
        not registered; FailedPrecondition if the list is not the current one minus the
        device. Afterwards the device is gone from every read, its signed requests are
        refused, its number is never given out again, and relay nodes are told (they
        end its sessions and purge its queue). Returns its record.
        """
        device.validate(field="device")
        if (caller.tenant, caller.user) != (device.tenant, device.user):
            raise PermissionDenied(
                f"device {caller} may not remove device {device}: only a device of "
                f"{device.tenant}/{device.user} may"
            )
        if device_list is None:
            raise InvalidArgument(
                "device_list is required: the user's new list without the device, signed by "
                "the account key"
            )
        record = await self._devices.get(device)
        if record is None:
            raise NotFound(f"device {device} is not registered")
        state = await self._accounts.account(device.tenant, device.user)
        current = lists.check_next(state, device_list, device.tenant, device.user)
        expected = tuple(d for d in current.devices if d.device != device.device)
        if not expected:
            raise FailedPrecondition(
                f"device {device} is the last device of {device.tenant}/{device.user}: a user "
                "keeps at least one (link a new device first, or reset the account with a "
                "reset token)"
            )
        if {(d.device, d.identity_key) for d in device_list.devices} != {
            (d.device, d.identity_key) for d in expected
        }:
            raise FailedPrecondition(
                f"device_list must be the current list (version {current.version}) without "
                f"device {device.device}: fetch the list again"
            )
        now = self._clock.now_ms()
        if not await self._accounts.remove_devices(
            device_list, (device.device,), now, expected=current.version
        ):
            raise FailedPrecondition(
                f"the device list of {device.tenant}/{device.user} changed meanwhile: fetch it "
                "again"
            )
        log.info("device %s removed by %s", device, caller)
        await self._announce_removed(device)
        return record

    async def _announce_removed(self, device: Address) -> None:
        if self._events is not None:
            await self._events.device_removed(device)

    async def identity_key(self, device: Address, *, by: Reader | None = None) -> bytes:
        """Return the Ed25519 identity key of ``device``; NotFound if not registered."""
        device.validate(field="device")
        self._check_reader(by, device.tenant, "read identity keys of")
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
