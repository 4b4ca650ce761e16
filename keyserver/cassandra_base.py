"""What the key directory's Cassandra stores share: retry rounds, backoff, key helpers."""

from __future__ import annotations

import asyncio
import random

from relay.model import Address

#: Lightweight-transaction rounds before giving up with Unavailable.
MAX_ROUNDS = 200
#: Cassandra's largest TTL (20 years).
MAX_TTL_SECONDS = 630_720_000
WHERE_DEVICE = "WHERE tenant = ? AND user = ? AND device = ?"
DEVICE_COLUMNS = (
    "device, identity_key, identity_dh_key, identity_dh_signature, registered_at_ms, removed_at_ms"
)
#: Every device row of a user (columns DEVICE_COLUMNS).
LIST_DEVICES = f"SELECT {DEVICE_COLUMNS} FROM {{ks}}.devices WHERE tenant = ? AND user = ?"


def device_key(device: Address) -> tuple[str, str, int]:
    """The partition key columns of a device, in CQL order."""
    return (device.tenant, device.user, device.device)


async def backoff(round_: int) -> None:
    """Jittered pause after a lost race with another process (not synchronisation)."""
    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * round_)))
