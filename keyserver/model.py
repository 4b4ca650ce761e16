"""Domain values of the key directory. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from relay.accounts import DeviceList
from relay.model import Address, registration_id


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    """An X25519 prekey vouched for by the device's identity key."""

    key_id: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    """An X25519 prekey handed out at most once."""

    key_id: int
    public_key: bytes


@dataclass(frozen=True, slots=True)
class PqPrekey:
    """An ML-KEM-1024 prekey vouched for by the device's identity key.

    One-time (handed out at most once) or the device's last-resort key (handed out when
    the one-time PQ pool is empty); the signature is over
    ``relay.authproof.pq_prekey_transcript(public_key)`` either way.
    """

    key_id: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A registered device: its address and identity keys.

    ``removed_at_ms`` is set once the device was removed: its number is never given out
    again, and the directory treats it as unknown everywhere else.
    """

    address: Address
    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    registered_at_ms: int
    removed_at_ms: int | None = None

    @property
    def registration_id(self) -> int:
        """The device's registration id (derived from its identity key)."""
        return registration_id(self.identity_key)


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What a sender needs to start a session with one device.

    ``signed_prekey`` is None only for a device whose registration was interrupted
    before its signed prekey was stored; ``one_time_prekey`` is None when the pool is empty.
    ``pq_prekey`` is a one-time PQ prekey, or the last-resort one (``pq_last_resort``)
    when that pool is empty; None only for a device that never published a PQ prekey
    (registered by an SDK older than PQXDH).
    """

    device: DeviceRecord
    signed_prekey: SignedPrekey | None
    one_time_prekey: OneTimePrekey | None
    pq_prekey: PqPrekey | None = None
    pq_last_resort: bool = False


@dataclass(frozen=True, slots=True)
class BundleKeys:
    """The prekeys a PrekeyHandout gives out for one bundle (see ``keyserver.ports``)."""

    signed_prekey: SignedPrekey | None
    one_time_prekey: OneTimePrekey | None
    pq_prekey: PqPrekey | None
    pq_last_resort: bool


@dataclass(frozen=True, slots=True)
class PrekeyStatus:
    """How full a device's one-time pools are, and whether it should upload more.

    ``replenish`` is set when either pool holds at most ``low_water_mark`` keys or the
    device has no last-resort PQ prekey.
    """

    one_time_prekeys: int
    one_time_pq_prekeys: int
    low_water_mark: int
    replenish: bool
    has_last_resort_pq_prekey: bool


@dataclass(frozen=True, slots=True)
class Registration:
    """A RegisterDevice request as the core sees it (not yet validated)."""

    tenant: str
    user: str
    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    signed_prekey: SignedPrekey | None
    one_time_prekeys: tuple[OneTimePrekey, ...]
    proof: bytes
    last_resort_pq_prekey: PqPrekey | None = None
    one_time_pq_prekeys: tuple[PqPrekey, ...] = ()
    account_key: bytes = b""
    device_list: DeviceList | None = None
    registration_token: str = ""
    reset: bool = False


@dataclass(frozen=True, slots=True)
class PrekeysAdded:
    """A PrekeyStore's answer to an add: how many are held now, and whether it fit.

    When ``accepted`` is False nothing was added: the new keys would have made the pool
    larger than the limit asked for.
    """

    held: int
    accepted: bool


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the key directory holds about a user's account.

    ``account_key`` and ``device_list`` are None for a user without an account (never
    registered, or registered before accounts existed). ``last_device`` is the highest
    device number ever given out for the user (0 if none): numbers are never reused.
    """

    account_key: bytes | None
    device_list: DeviceList | None
    last_device: int

    @property
    def exists(self) -> bool:
        """Whether the user has an account or any device, now or before."""
        return self.account_key is not None or self.last_device > 0


@dataclass(frozen=True, slots=True)
class NewDevice:
    """The identity of a device about to be added to its user's list."""

    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    registered_at_ms: int


@dataclass(frozen=True, slots=True)
class LinkApproval:
    """How a link request was approved: the new device's number, sealed key and list."""

    device: int
    sealed_account: bytes
    device_list: DeviceList


@dataclass(frozen=True, slots=True)
class PendingLink:
    """A new device's request to join an existing user, until approved or expired."""

    request_id: bytes
    tenant: str
    user: str
    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    signed_prekey: SignedPrekey
    last_resort_pq_prekey: PqPrekey
    link_key: bytes
    created_at_ms: int
    expires_at_ms: int
    approval: LinkApproval | None = None


@dataclass(frozen=True, slots=True)
class LinkRequestInput:
    """A RequestLink call as the core sees it (not yet validated)."""

    tenant: str
    user: str
    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    signed_prekey: SignedPrekey | None
    last_resort_pq_prekey: PqPrekey | None
    link_key: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class Reader:
    """Who makes an authenticated read: a device, a tenant's service, or a relay node.

    ``tenant`` None means every tenant (relay nodes); ``device`` is set for a device.
    ``name`` identifies the caller in rate limits and logs.
    """

    name: str
    tenant: str | None
    device: Address | None = None
    relay_node: bool = False
