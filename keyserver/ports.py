"""The storage protocols the key directory core depends on, one per concern.

``DeviceDirectory`` (devices and their numbers), ``AccountDirectory`` (account keys
and signed device lists: every change of a user's devices goes through it),
``LinkRequests`` (new devices waiting for approval), ``OnceOnly`` (registration
tokens and signed requests, each accepted once, across processes), ``PrekeyStore``
(the X25519 signed prekey and one-time pool), ``PqPrekeyStore`` (the ML-KEM-1024
last-resort prekey and one-time pool) and ``PrekeyHandout`` (giving out one bundle's
keys). All are written so that a backend without multi-row transactions (Cassandra,
with lightweight transactions) can implement them; the conformance suite in
``tests/keyserver/conformance.py`` pins the behaviour every backend must have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from keyserver.model import (
    AccountState,
    BundleKeys,
    DeviceRecord,
    LinkApproval,
    NewDevice,
    OneTimePrekey,
    PendingLink,
    PqPrekey,
    PrekeysAdded,
    SignedPrekey,
)
from relay.accounts import DeviceList
from relay.model import Address


class DeviceDirectory(Protocol):
    """Registered devices and their identity keys.

    The key directory core adds and removes devices only through ``AccountDirectory``
    (so that the signed list and the devices change together); ``register`` and
    ``remove`` are the primitives those steps are made of, kept here for the stores'
    own conformance suite and for users registered before accounts existed.
    """

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
        """Register a device of (tenant, user) under the next device number; return it.

        Numbers are assigned atomically: under any concurrency each registration of a user
        gets its own number; the first device of a user is 1, then 2, 3, ..., and a number
        is never given out twice, not even after its device was removed. If the user
        already has a device with ``identity_key`` (removed or not), nothing is written and
        that device's stored record is returned (a retried registration), whatever the
        other arguments; ``removed_at_ms`` tells a removed one.
        """
        ...

    async def get(self, address: Address) -> DeviceRecord | None:
        """Return the record of the device at ``address``; None if none or removed."""
        ...

    async def list(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return every device of (tenant, user) not removed, ascending (maybe none)."""
        ...

    async def remove(self, address: Address, removed_at_ms: int) -> bool:
        """Mark the device at ``address`` removed at ``removed_at_ms``; keep its row.

        Returns False (and writes nothing) if there is no such device or it was removed
        before. After it, ``get`` and ``list`` no longer return the device, and its number
        and identity key stay taken.
        """
        ...

    async def find_identity(
        self, tenant: str, user: str, identity_key: bytes
    ) -> DeviceRecord | None:
        """The device of (tenant, user) ever registered with ``identity_key``, removed or not."""
        ...


class AccountDirectory(Protocol):
    """Account keys and signed device lists; the only way devices are added or removed.

    Each change is one atomic step on the user (a SQLite transaction; a conditional batch
    on the user's Cassandra partition): it happens only if the list version the caller
    read is still the current one, so of two concurrent changes one wins and the other
    answers False (re-read and decide again). Device numbers are never reused: a new
    device's number must be ``last_device + 1``.
    """

    async def account(self, tenant: str, user: str) -> AccountState:
        """The user's account key, latest signed list and highest device number ever used."""
        ...

    async def create(
        self, device_list: DeviceList, device: NewDevice, *, replaces: int | None = None
    ) -> bool:
        """Create the account of ``device_list``'s user with its one device ``device``.

        ``device_list`` names exactly one device, numbered ``last_device + 1``. Without
        ``replaces`` the user must have no account and no device; with it (a reset) the
        current list must have version ``replaces``, and every device of the old account
        is marked removed. False (nothing written) if that does not hold.
        """
        ...

    async def add_device(
        self, device_list: DeviceList, device: NewDevice, *, expected: int
    ) -> bool:
        """Store ``device_list`` and register its one new device ``device``.

        Only if the current list still has version ``expected``; the new device is the
        one number in ``device_list`` the current list lacks, ``last_device + 1``.
        """
        ...

    async def remove_devices(
        self, device_list: DeviceList, removed: Sequence[int], removed_at_ms: int, *, expected: int
    ) -> bool:
        """Store ``device_list`` and mark devices ``removed`` removed.

        Only if the current list still has version ``expected``. Removed devices keep
        their numbers and identity keys taken.
        """
        ...


class LinkRequests(Protocol):
    """New devices waiting for one of their user's devices to approve them.

    Requests are shared by every key directory process (they live in the key store) and
    vanish when they expire.
    """

    async def add(self, link: PendingLink, max_pending: int, now_ms: int) -> bool:
        """Store ``link`` unless its user has ``max_pending`` requests waiting already.

        Waiting: unexpired and unapproved. False (nothing stored) when that is reached.
        """
        ...

    async def pending(self, tenant: str, user: str, now_ms: int) -> tuple[PendingLink, ...]:
        """The user's unexpired, unapproved requests, oldest first."""
        ...

    async def get(self, request_id: bytes, now_ms: int) -> PendingLink | None:
        """The request ``request_id`` (approved or not); None if unknown or expired."""
        ...

    async def approve(self, request_id: bytes, approval: LinkApproval, now_ms: int) -> bool:
        """Record ``approval`` once; False if the request is gone or approved already."""
        ...


class OnceOnly(Protocol):
    """Things accepted at most once until they expire, across key directory processes."""

    async def first_use(self, kind: str, digest: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """Record ``digest`` of ``kind`` (``token``, ``request``) until ``expires_at_ms``.

        True the first time; False if it was recorded before and has not expired.
        Atomic across processes (a key is first-used once under any concurrency).
        """
        ...


class PrekeyStore(Protocol):
    """Per-device signed prekeys and pools of one-time prekeys."""

    async def set_signed_prekey(self, device: Address, prekey: SignedPrekey) -> None:
        """Store ``prekey`` as the signed prekey of ``device``, replacing any previous one."""
        ...

    async def signed_prekey(self, device: Address) -> SignedPrekey | None:
        """Return the current signed prekey of ``device``, or None if none was set."""
        ...

    async def add_one_time_prekeys(
        self, device: Address, prekeys: Sequence[OneTimePrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` to the pool of ``device``, idempotently by key_id.

        A key_id the device has ever added before (held, or claimed already) is ignored,
        so a retried publish never puts a claimed key back. If the pool would then hold
        more than ``max_held`` unclaimed keys, nothing is added and ``accepted`` is False.
        ``held`` is the number of unclaimed keys after the call.
        """
        ...

    async def claim_one_time_prekey(self, device: Address) -> OneTimePrekey | None:
        """Remove and return the unclaimed key of ``device`` with the lowest key_id.

        Atomic: under any concurrency, across processes, a key is handed out at most once.
        Returns None when the pool is empty.
        """
        ...

    async def count_one_time_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time prekeys ``device`` holds."""
        ...


class PqPrekeyStore(Protocol):
    """Per-device ML-KEM-1024 prekeys: the last-resort key and the one-time pool.

    The pool behaves as ``PrekeyStore``'s one-time pool does (idempotent adds by key_id,
    a claimed key_id never added again, ``max_held`` all or nothing, claims at most once).
    """

    async def set_last_resort_pq_prekey(self, device: Address, prekey: PqPrekey) -> None:
        """Store ``prekey`` as the last-resort PQ prekey of ``device``, replacing any other."""
        ...

    async def last_resort_pq_prekey(self, device: Address) -> PqPrekey | None:
        """Return the last-resort PQ prekey of ``device``, or None if none was set."""
        ...

    async def add_one_time_pq_prekeys(
        self, device: Address, prekeys: Sequence[PqPrekey], max_held: int
    ) -> PrekeysAdded:
        """Add ``prekeys`` to the one-time PQ pool of ``device``, idempotently by key_id.

        As ``PrekeyStore.add_one_time_prekeys``: a key_id added before (held or claimed)
        is ignored; past ``max_held`` unclaimed keys nothing is added (``accepted`` False).
        """
        ...

    async def claim_one_time_pq_prekey(self, device: Address) -> PqPrekey | None:
        """Remove and return the unclaimed one-time PQ key with the lowest key_id.

        Atomic across processes: a key is handed out at most once. None when empty.
        """
        ...

    async def count_one_time_pq_prekeys(self, device: Address) -> int:
        """Return how many unclaimed one-time PQ prekeys ``device`` holds."""
        ...


class PrekeyHandout(Protocol):
    """Giving out the keys of one prekey bundle."""

    async def claim_bundle_keys(self, device: Address) -> BundleKeys:
        """Read the signed prekeys of ``device`` and claim one one-time key of each pool.

        Returns the signed prekey, one one-time X25519 prekey (None when that pool is
        empty) and one one-time PQ prekey, or the last-resort PQ prekey when that pool is
        empty (``pq_last_resort`` True). Each one-time key is handed out at most once
        under any concurrency, across processes. A device without a signed prekey or
        without any PQ prekey cannot be used for a session: nothing of it is claimed then
        (the missing key is None). Backends with transactions (SQLite) read and claim in
        one; others (Cassandra) claim each key with its own lightweight transaction.
        """
        ...


@dataclass(frozen=True, slots=True)
class KeyStores:
    """Every store the key directory core needs, on one backend."""

    devices: DeviceDirectory
    accounts: AccountDirectory
    links: LinkRequests
    once: OnceOnly
    prekeys: PrekeyStore
    pq_prekeys: PqPrekeyStore
    handout: PrekeyHandout


class DeviceEvents(Protocol):
    """Where the key directory announces changes that relay nodes must act on at once."""

    async def device_removed(self, device: Address) -> None:
        """Announce that ``device`` was removed. Best effort: never raises.

        Relay nodes then end its sessions, purge its queue and forget its identity key.
        """
        ...
