"""A session's queue re-reads resume where its last read ended (``resume_point``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from relay.clock import SystemClock
from relay.config import LimitsConfig
from relay.core.delivery import Relay
from relay.core.sessions import Deliver
from relay.metrics import RelayMetrics
from relay.model import Address, Envelope, Outcome, QueuePage
from relay.stores.sqlite_queue import SqliteQueue
from tests.test_core import FakeIdentities

ALICE = Address("t", "alice", 1)
BOB = Address("t", "bob", 1)


class RecordingQueue(SqliteQueue):
    """The SQLite queue, recording where each read of bob's queue started."""

    reads_after: list[int]

    async def read(self, device: Address, after: int, limit: int, now_ms: int) -> QueuePage:
        if device == BOB:
            self.reads_after.append(after)
        return await super().read(device, after, limit, now_ms)


async def test_a_reread_starts_where_the_last_read_ended(tmp_path: Path) -> None:
    """bob's session reads 3 stored envelopes; a 4th sent on a new stream (its push
    proves no order, so the session re-reads) is read from the 3rd's seq on, not from 0."""
    async with RecordingQueue(tmp_path / "q.db") as queue:
        queue.reads_after = []
        identities = FakeIdentities()
        identities.keys[ALICE] = os.urandom(32)
        identities.keys[BOB] = os.urandom(32)
        relay = Relay(
            queue=queue,
            identities=identities,
            clock=SystemClock(),
            limits=LimitsConfig(),
            metrics=RelayMetrics(),
        )
        early = [Envelope(os.urandom(16), ALICE, BOB, b"%d" % i) for i in range(3)]
        outs = await relay.send(ALICE, early)
        assert [o.outcome for o in outs] == [Outcome.STORED] * 3
        async with relay.session(BOB, receive=True) as bob:
            events = bob.events()
            first = await anext(events)
            assert isinstance(first, Deliver) and len(first.envelopes) == 3
            await anext(events)  # QueueEmpty
            assert queue.reads_after == [0]
            page = await queue.read(BOB, 0, 10, SystemClock().now_ms())
            last = page.items[-1].seq
            queue.reads_after.clear()
            late = Envelope(os.urandom(16), ALICE, BOB, b"late")
            (out,) = await relay.send(ALICE, [late])  # unary-like: a fresh SendOrder
            assert out.outcome is Outcome.STORED
            got = await asyncio.wait_for(anext(events), 10)
            assert isinstance(got, Deliver)
            assert [e.content for e in got.envelopes] == [b"late"]
            assert queue.reads_after[:1] == [last]
            await events.aclose()
