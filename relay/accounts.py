"""Accounts: a user's device list, signed by the user's account key. No I/O here.

Every user has one Ed25519 *account key*. Its private half lives only on the user's
devices (the first device makes it; a device that joins gets it from one that is
already linked, end to end). The key directory stores the latest list the account key
signed and refuses any list that is not signed by it or whose version does not grow;
senders verify the signature themselves before they encrypt to a device, so a directory
that adds a device of its own is caught (see docs/security.md).

Shared by the key directory (which checks lists) and the SDK (which signs and checks).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relay import authproof
from relay.errors import InvalidArgument
from relay.model import MAX_DEVICE, Address, registration_id

#: Ed25519 public keys and signatures.
KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class ListedDevice:
    """One device as its user's signed list names it."""

    device: int
    identity_key: bytes
    registration_id: int

    @classmethod
    def of(cls, device: int, identity_key: bytes) -> ListedDevice:
        """The entry of device ``device`` with ``identity_key`` (registration id derived)."""
        return cls(device, identity_key, registration_id(identity_key))


@dataclass(frozen=True, slots=True)
class DeviceList:
    """A user's devices, version ``version``, signed by ``account_key``."""

    tenant: str
    user: str
    version: int
    timestamp_ms: int
    devices: tuple[ListedDevice, ...]
    account_key: bytes
    signature: bytes = b""

    def transcript(self) -> bytes:
        """The bytes the account key signs (every field but the signature)."""
        return authproof.device_list_transcript(
            self.tenant,
            self.user,
            self.version,
            self.timestamp_ms,
            [(d.device, d.identity_key, d.registration_id) for d in self.devices],
            account_key=self.account_key,
        )

    def verifies(self) -> bool:
        """Whether ``signature`` is the account key's signature of this list."""
        return authproof.verify(self.account_key, self.signature, self.transcript())

    def numbers(self) -> tuple[int, ...]:
        """The device numbers listed, in list order."""
        return tuple(d.device for d in self.devices)

    def find(self, device: int) -> ListedDevice | None:
        """The entry of device number ``device``, or None if it is not listed."""
        for entry in self.devices:
            if entry.device == device:
                return entry
        return None

    def addresses(self) -> tuple[Address, ...]:
        """The addresses of the listed devices."""
        return tuple(Address(self.tenant, self.user, d.device) for d in self.devices)

    def check_shape(self, *, field: str = "device_list") -> DeviceList:
        """Return self if well-formed (not whether it verifies), else raise InvalidArgument.

        Checks the sizes of keys and signature, ascending distinct device numbers in
        range, and that each registration id is the one derived from its identity key.
        """
        Address(self.tenant, self.user, 1).validate(field=field)
        if len(self.account_key) != KEY_BYTES:
            raise InvalidArgument(
                f"{field}.account_key must be {KEY_BYTES} bytes, got {len(self.account_key)}"
            )
        if authproof.is_small_order(self.account_key):
            raise InvalidArgument(f"{field}.account_key is a small-order point, not a usable key")
        if len(self.signature) != SIGNATURE_BYTES:
            raise InvalidArgument(
                f"{field}.signature must be {SIGNATURE_BYTES} bytes, got {len(self.signature)}"
            )
        if self.version < 1:
            raise InvalidArgument(f"{field}.version must be at least 1, got {self.version}")
        previous = 0
        for i, entry in enumerate(self.devices):
            name = f"{field}.devices[{i}]"
            if not 1 <= entry.device <= MAX_DEVICE:
                raise InvalidArgument(
                    f"{name}.device {entry.device} is out of range 1..{MAX_DEVICE}"
                )
            if entry.device <= previous:
                raise InvalidArgument(
                    f"{name}.device {entry.device}: devices must be listed once each, ascending"
                )
            previous = entry.device
            if len(entry.identity_key) != KEY_BYTES:
                raise InvalidArgument(
                    f"{name}.identity_key must be {KEY_BYTES} bytes, got {len(entry.identity_key)}"
                )
            if entry.registration_id != registration_id(entry.identity_key):
                raise InvalidArgument(
                    f"{name}.registration_id {entry.registration_id} is not the one of its "
                    "identity_key (relay.model.registration_id)"
                )
        return self


def build_list(
    tenant: str,
    user: str,
    version: int,
    timestamp_ms: int,
    devices: Iterable[ListedDevice],
    *,
    account_key: bytes,
) -> DeviceList:
    """An unsigned list of ``devices`` (sorted by number); sign it with :func:`signed`."""
    ordered = tuple(sorted(devices, key=lambda d: d.device))
    return DeviceList(tenant, user, version, timestamp_ms, ordered, account_key)


def same_devices(a: Sequence[ListedDevice], b: Sequence[ListedDevice]) -> bool:
    """Whether two lists name the same devices with the same identity keys."""
    return {(d.device, d.identity_key) for d in a} == {(d.device, d.identity_key) for d in b}


_ENTRY = struct.Struct(">I32sI")


def encode_devices(devices: Sequence[ListedDevice]) -> bytes:
    """The compact stored form of a list's devices (see :func:`decode_devices`)."""
    return b"".join(_ENTRY.pack(d.device, d.identity_key, d.registration_id) for d in devices)


def decode_devices(data: bytes) -> tuple[ListedDevice, ...]:
    """Inverse of :func:`encode_devices` (for stored lists, whose keys are 32 bytes)."""
    return tuple(ListedDevice(*entry) for entry in _ENTRY.iter_unpack(data))
