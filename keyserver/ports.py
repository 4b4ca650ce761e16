"""The storage protocols the key directory core depends on, one per concern.

``DeviceDirectory`` (devices and their numbers), ``PrekeyStore`` (the X25519 signed prekey
and one-time pool), ``PqPrekeyStore`` (the ML-KEM-1024 last-resort prekey and one-time
pool) and ``PrekeyHandout`` (giving out one bundle's keys). All are written so that a
backend without multi-row transactions (Cassandra, with lightweight transactions) can
implement them; the conformance suite in ``tests/keyserver/conformance.py`` pins the
behaviour every backend must have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from keyserver.model import (
    BundleKeys,
    DeviceRecord,
    OneTimePrekey,
    PqPrekey,
    PrekeysAdded,
    SignedPrekey,
)
from relay.model import Address


class DeviceDirectory(Protocol):
    """Registered devices and their identity keys."""

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
    prekeys: PrekeyStore
    pq_prekeys: PqPrekeyStore
    handout: PrekeyHandout
