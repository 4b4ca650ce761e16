"""The storage protocols the key directory core depends on, one per concern.

Both are written so that a backend without multi-row transactions (Cassandra, with
lightweight transactions) can implement them; the conformance suite in
``tests/keyserver/conformance.py`` pins the behaviour every backend must have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from keyserver.model import DeviceRecord, OneTimePrekey, PrekeysAdded, SignedPrekey
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
        gets its own number; the first device of a user is 1, then 2, 3, ... If the user
        already has a device with ``identity_key``, nothing is written and that device's
        stored record is returned (a retried registration), whatever the other arguments.
        """
        ...

    async def get(self, address: Address) -> DeviceRecord | None:
        """Return the record of the device at ``address``, or None if there is none."""
        ...

    async def list(self, tenant: str, user: str) -> tuple[DeviceRecord, ...]:
        """Return every device of (tenant, user) in ascending device number (maybe none)."""
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
