"""How the Cassandra queue lays envelopes out: seqs, buckets, expiry hours and TTLs.

A ``seq`` is a time-ordered 64-bit integer made by the writer: the clock's
milliseconds shifted left by ``SEQ_SHIFT`` bits, plus a counter in the low bits. It is
strictly increasing within a process (if the clock stalls or steps back, the counter
carries on from the last seq), so a queue read in seq order is in append order for
every writer, and across writers in clock order. Its milliseconds pick the day bucket
of the row (the partition), so a device's partitions stay bounded by a day's traffic.
"""

from __future__ import annotations

import secrets
import zlib

from relay.clock import Clock
from relay.model import Address

#: Low bits of a seq that count appends within one millisecond.
SEQ_SHIFT = 22
#: Width of a queue partition (one bucket), by default one day.
DEFAULT_BUCKET_MS = 86_400_000
HOUR_MS = 3_600_000
#: Partitions per expiry hour, so that one hour's expiry index is no hot spot.
EXPIRY_SHARDS = 8
#: Rows outlive their envelope by this much: reads skip them once expired, and
#: purge_expired (which must run within this grace) still finds them to fix the depth.
TTL_GRACE_SECONDS = 86_400
#: Cassandra's largest TTL (20 years).
MAX_TTL_SECONDS = 630_720_000


#: Low bits of a seq that tell writers apart (random per SeqSource).
WRITER_BITS = 12


class SeqSource:
    """Time-ordered seqs (``ms << SEQ_SHIFT | counter << WRITER_BITS | writer``).

    Strictly increasing here. ``writer`` is random per source, so two relay nodes
    writing to one device in the same millisecond make different seqs (and should
    they ever make the same one, ``message_id`` in the row key keeps both rows).
    """

    def __init__(self, clock: Clock, writer: int | None = None) -> None:
        self._clock = clock
        self._writer = secrets.randbits(WRITER_BITS) if writer is None else writer
        self._last = 0  # without the writer bits

    def next(self) -> int:
        """The next seq: at least the clock's, and above every seq handed out before."""
        base = max(self._last + (1 << WRITER_BITS), self._clock.now_ms() << SEQ_SHIFT)
        self._last = base
        return base | self._writer


def seq_at(ms: int) -> int:
    """The smallest seq a writer whose clock reads ``ms`` can make."""
    return max(0, ms) << SEQ_SHIFT


def bucket_of(seq: int, bucket_ms: int) -> int:
    """The partition bucket of ``seq``."""
    return (seq >> SEQ_SHIFT) // bucket_ms


def ms_of(seq: int) -> int:
    """The writer's clock (milliseconds) when it made ``seq``."""
    return seq >> SEQ_SHIFT


def expiry_hour(expires_at_ms: int) -> int:
    """The expiry-index hour of an envelope expiring at ``expires_at_ms``."""
    return expires_at_ms // HOUR_MS


def expiry_shard(device: Address) -> int:
    """The expiry-index shard of ``device`` (stable across processes)."""
    return zlib.crc32(f"{device.tenant}/{device.user}/{device.device}".encode()) % EXPIRY_SHARDS


def ttl_until(expires_at_ms: int, now_ms: int, grace_seconds: int = TTL_GRACE_SECONDS) -> int:
    """A Cassandra TTL (seconds, >= 1) lasting past ``expires_at_ms`` by ``grace_seconds``."""
    remaining = -(-(expires_at_ms - now_ms) // 1000)  # ceiling division
    return min(MAX_TTL_SECONDS, max(1, remaining + grace_seconds))


def key(device: Address) -> tuple[str, str, int]:
    """The (tenant, user, device) key columns of ``device``."""
    return (device.tenant, device.user, device.device)
