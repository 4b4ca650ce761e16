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
        #: See ``messages.Failover.stored_meanwhile``.
        self.stored_meanwhile = 0
        self._expected: int | None = None
        self._unanswered: dict[int, set[int]] = {}
        #: First copies received of envelopes in ``_unanswered`` (they do not count).
        self._unanswered_seen = 0
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
        away = stream.away
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
            first_copy = receipts.add(worker, seq) == 1
            if first_copy:
                if away is not None and away[0] <= intended <= away[1]:
                    self.stored_meanwhile += 1
                if self._unanswered and seq in self._unanswered.get(worker, ()):
                    self._unanswered_seen += 1
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
        self._check()

    def expect(self, unique: int, unanswered: dict[int, list[int]] | None = None) -> None:
        """Set how many distinct envelopes this worker must see before the drain ends.

        ``unanswered`` (sender worker -> sequences): envelopes that may or may not
        arrive; their deliveries do not count towards ``unique``.
        """
        self._expected = unique
        self._unanswered = {w: set(seqs) for w, seqs in (unanswered or {}).items() if seqs}
        counts = self.receipts.counts
        self._unanswered_seen = sum(
            1
            for w, seqs in self._unanswered.items()
            for seq in seqs
            if w in counts and seq < len(counts[w]) and counts[w][seq]
        )
        self._check()

    def _check(self) -> None:
        expected = self._expected
        if expected is not None and self.receipts.unique - self._unanswered_seen >= expected:
            self._reached.set()

    async def reached(self) -> None:
        """Return once the expected deliveries arrived (see :meth:`expect`)."""
        await self._reached.wait()
