"""Domain values of the key directory. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from relay.model import Address


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
class DeviceRecord:
    """A registered device: its address and identity keys."""

    address: Address
    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    registered_at_ms: int


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What a sender needs to start a session with one device.

    ``signed_prekey`` is None only for a device whose registration was interrupted
    before its signed prekey was stored; ``one_time_prekey`` is None when the pool is empty.
    """

    device: DeviceRecord
    signed_prekey: SignedPrekey | None
    one_time_prekey: OneTimePrekey | None


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


@dataclass(frozen=True, slots=True)
class PrekeysAdded:
    """A PrekeyStore's answer to an add: how many are held now, and whether it fit.

    When ``accepted`` is False nothing was added: the new keys would have made the pool
    larger than the limit asked for.
    """

    held: int
    accepted: bool
