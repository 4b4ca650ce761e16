"""The queue anti-pattern, measured: reading stays fast after 100,000 acked messages.

A device queue gets 100k envelopes, all acked (deleted: 100k tombstones in its
partition), then a few new ones. Reading the next page from ``after=0`` must not step
over the tombstones: Cassandra's query trace ("Read N live rows and M tombstone
cells") shows what the read scanned. The measured rates and latency are printed
(``pytest -s``) for the record; only the tombstone count is asserted.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time

import pytest

from relay.clock import FakeClock, SystemClock
from relay.common.cassandra.session import CassandraSession
from relay.errors import Unavailable
from relay.model import Address, Envelope, EnvelopeKey, Outcome
from relay.stores.cassandra.layout import DEFAULT_BUCKET_MS, bucket_of
from relay.stores.cassandra.queue import DEFAULT_FLOOR_LAG_MS, CassandraQueue
from tests.conformance.queue import ALICE, BIG

pytestmark = pytest.mark.services

ACKED = 100_000
BATCH = 1000
CONCURRENT_BATCHES = 4
DEVICE = Address("t", "busy", 1)
_TRACE_RE = re.compile(r"Read (\d+) live rows and (\d+) tombstone cells")


def scanned(traces: list[list[str]]) -> tuple[int, int]:
    """Live rows and tombstones the traced statements read."""
    live = dead = 0
    for events in traces:
        for event in events:
            match = _TRACE_RE.search(event)
            if match:
                live += int(match.group(1))
                dead += int(match.group(2))
    return live, dead


async def in_batches(work: list[list[bytes]], call: object) -> float:
    """Run ``call`` on each batch, CONCURRENT_BATCHES at a time; return seconds taken."""
    gate = asyncio.Semaphore(CONCURRENT_BATCHES)

    async def one(batch: list[bytes]) -> None:
        async with gate:
            await call(batch)  # type: ignore[operator]

    start = time.perf_counter()
    await asyncio.gather(*(one(b) for b in work))
    return time.perf_counter() - start


async def test_next_page_after_100k_acked_scans_few_tombstones(fresh: CassandraSession) -> None:
    # Early in today's day bucket, so that every row of the test lands in one bucket.
    clock = FakeClock(SystemClock().now_ms() // DEFAULT_BUCKET_MS * DEFAULT_BUCKET_MS + 3_600_000)
    queue = CassandraQueue(fresh, clock)
    expires = clock.now_ms() + DEFAULT_BUCKET_MS
    ids = [os.urandom(16) for _ in range(ACKED)]
    batches = [ids[i : i + BATCH] for i in range(0, ACKED, BATCH)]
    seqs: list[int] = []

    async def append(batch: list[bytes]) -> None:
        # The messages arrive over time: the floor never passes a row written less than
        # DEFAULT_FLOOR_LAG_MS (of the writers' clocks) before the newest acked one.
        clock.advance(DEFAULT_FLOOR_LAG_MS // 10)
        envs = [Envelope(m, ALICE, DEVICE, b"m" * 32, server_timestamp_ms=1) for m in batch]
        results = await queue.append(envs, [expires] * len(envs), BIG)
        assert all(r.outcome is Outcome.STORED for r in results)
        seqs.extend(r.seq for r in results)

    write_s = await in_batches(batches, append)
    # A message more than the lag later, acked with the others (traffic goes on).
    clock.advance(DEFAULT_FLOOR_LAG_MS + 1000)
    last = os.urandom(16)
    await append([last])

    async def ack(batch: list[bytes]) -> None:
        assert await queue.ack(DEVICE, [EnvelopeKey(ALICE, m) for m in batch]) == len(batch)

    ack_s = await in_batches([*batches, [last]], ack)
    assert await queue.depth(DEVICE) == (0, 0)

    new = [Envelope(os.urandom(16), ALICE, DEVICE, b"n", server_timestamp_ms=2) for _ in range(5)]
    await queue.append(new, [expires] * 5, BIG)
    latencies = []
    for _ in range(9):
        start = time.perf_counter()
        page = await queue.read(DEVICE, 0, 256, clock.now_ms())
        latencies.append(time.perf_counter() - start)
        assert [i.envelope.message_id for i in page.items] == [e.message_id for e in new]
        assert not page.more
    with fresh.tracing() as traces:
        await queue.read(DEVICE, 0, 256, clock.now_ms())
    live, tombstones = scanned(traces)

    # The yardstick: the same partition read below the floor, over a slice holding the
    # last 5,000 acked rows. The trace must see their tombstones, or the figure above
    # proves nothing.
    seqs.sort()
    bucket = bucket_of(seqs[0], DEFAULT_BUCKET_MS)
    assert bucket_of(seqs[-1], DEFAULT_BUCKET_MS) == bucket
    naive = (
        "SELECT seq FROM {ks}.queue WHERE tenant = ? AND user = ? AND device = ?"
        " AND bucket = ? AND seq > ? LIMIT 1"
    )
    where = (DEVICE.tenant, DEVICE.user, DEVICE.device, bucket)
    with fresh.tracing() as control:
        await fresh.execute(naive, (*where, seqs[-5_001]), op="control read")
    _, control_tombstones = scanned(control)
    # And the read a queue without a floor would make, from seq 0.
    start = time.perf_counter()
    try:
        await fresh.execute(naive, (*where, 0), op="read from 0 without the floor")
        unfloored = f"{(time.perf_counter() - start) * 1000:.0f} ms"
    except Unavailable as exc:  # Cassandra aborts reads past tombstone_failure_threshold
        unfloored = f"aborted by Cassandra ({type(exc.__cause__).__name__})"

    median_ms = statistics.median(latencies) * 1000
    print(
        f"\n100k acked: append {ACKED / write_s:,.0f} msg/s ({write_s:.1f} s), "
        f"ack {ACKED / ack_s:,.0f} msg/s ({ack_s:.1f} s), "
        f"next page from after=0: median {median_ms:.1f} ms over {len(latencies)} reads, "
        f"traced {live} live rows and {tombstones} tombstones; "
        f"control read below the floor over 5,000 acked rows: {control_tombstones} tombstones; "
        f"the same read from seq 0 without the floor: {unfloored}"
    )
    assert live >= 5
    assert tombstones < 1000
    assert control_tombstones >= 4_000  # the trace does see tombstones when there are some
