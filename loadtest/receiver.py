"""The receiving side of a worker: latency per envelope, receipts, acks.

Latency is receipt time minus the intended send time in the envelope's header (both on
CLOCK_MONOTONIC, which Linux shares between processes), so a late send counts against
the system under test rather than vanishing (no coordinated omission). Deliveries to
devices that were offline when the envelope was sent (store and forward) go to a
separate histogram: their latency includes the time the device stayed away.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence

from loadtest.intervals import IntervalCounters
from loadtest.latency import Histogram
from loadtest.ledger import Receipts
from loadtest.streams import DeviceStream
from loadtest.wire import HEADER, MAGIC, MESSAGE_ID
from relaypb.relay.v1 import relay_pb2


class Receiver:
    """Counts, times and acknowledges every envelope delivered to this worker's devices."""

    def __init__(self, run_tag: bytes, counters: Callable[[], IntervalCounters]) -> None:
        self.run_tag = run_tag
        self.counters = counters
        self.receipts = Receipts()
        self.drained = Histogram()
        self.errors: Counter[str] = Counter()
        self._expected: int | None = None
        self._reached = asyncio.Event()

    def on_deliver(self, stream: DeviceStream, envelopes: Sequence[relay_pb2.Envelope]) -> None:
        """Record a Deliver frame and queue its ack."""
        now = time.monotonic_ns()
        counters = self.counters()
        hist = self.drained if stream.late else counters.live
        ids: list[bytes] = []
        me = stream.identity.index
        receipts, run_tag = self.receipts, self.run_tag
        last_intended, run = -1, 0
        for env in envelopes:
            mid = env.message_id
            ids.append(mid)
            content = env.content
            if len(mid) != MESSAGE_ID.size or len(content) < HEADER.size:
                receipts.unexpected += 1
                continue
            tag, worker, _, seq = MESSAGE_ID.unpack(mid)
            magic, h_worker, h_seq, intended, recipient = HEADER.unpack_from(content)
            if tag != run_tag or magic != MAGIC or (h_worker, h_seq) != (worker, seq):
                receipts.unexpected += 1
                continue
            if recipient != me:
                self.errors["MISROUTED"] += 1
                receipts.unexpected += 1
                continue
            receipts.add(worker, seq)
            if intended == last_intended:
                run += 1
                continue
            if run:
                hist.record_us((now - last_intended) // 1000, run)
            last_intended, run = intended, 1
        if run:
            hist.record_us((now - last_intended) // 1000, run)
        counters.delivered += len(envelopes)
        stream.ack(ids)
        if self._expected is not None and receipts.unique >= self._expected:
            self._reached.set()

    def expect(self, unique: int) -> None:
        """Set how many distinct envelopes this worker must see before the drain ends."""
        self._expected = unique
        if self.receipts.unique >= unique:
            self._reached.set()

    async def reached(self) -> None:
        """Return once the expected deliveries arrived (see :meth:`expect`)."""
        await self._reached.wait()
