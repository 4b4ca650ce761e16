"""The embedded SQLite queue: the conformance suite plus a Hypothesis state machine."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from relay.clock import FakeClock
from relay.model import Address, Envelope, Outcome, QueueLimits
from relay.stores.sqlite_queue import SqliteQueue
from tests.conformance.queue import BIG, BOB, BOB2, NOW, QueueConformance, env, read_all


class TestSqliteQueue(QueueConformance):
    @pytest.fixture
    async def queue(self, tmp_path: Path) -> AsyncIterator[SqliteQueue]:
        async with SqliteQueue(tmp_path / "queue.db", clock=FakeClock(NOW)) as q:
            yield q


DEVICES = [Address("t", "u", d) for d in (1, 2)]
SENDERS = [Address("t", s, 1) for s in ("a", "b")]


class QueueModel(RuleBasedStateMachine):
    """Order and cursor invariants against a model: per device, a list in append order."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.queue = SqliteQueue(Path(self.dir.name) / "q.db", clock=FakeClock(NOW))
        self.loop.run_until_complete(self.queue.__aenter__())
        self.model: dict[Address, list[bytes]] = {d: [] for d in DEVICES}
        self.accepted: set[tuple[Address, bytes]] = set()
        self.limits = QueueLimits(max_depth=6, max_bytes=1 << 30)

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @rule(
        picks=st.lists(
            st.tuples(st.sampled_from(DEVICES), st.sampled_from(SENDERS), st.booleans()),
            min_size=1,
            max_size=5,
        )
    )
    def append(self, picks: list[tuple[Address, Address, bool]]) -> None:
        envs = []
        for device, sender, reuse in picks:
            old = [m for (d, m) in self.accepted if d == device]
            mid = sorted(old)[0] if reuse and old else os.urandom(16)
            envs.append(Envelope(mid, sender, device, b"c"))
        results = self.run(self.queue.append(envs, [NOW + 10**9] * len(envs), self.limits))
        for e, r in zip(envs, results, strict=True):
            key = (e.recipient, e.message_id)
            if key in self.accepted:
                assert r.outcome is Outcome.DUPLICATE
            elif len(self.model[e.recipient]) >= self.limits.max_depth:
                assert r.outcome is Outcome.REJECTED and r.limit == "max_queue_depth"
            else:
                assert r.outcome is Outcome.STORED
                self.accepted.add(key)
                self.model[e.recipient].append(e.message_id)

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def ack(self, device: Address, data: st.DataObject) -> None:
        ids = self.model[device]
        if not ids:
            return
        chosen = data.draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))
        removed = self.run(self.queue.ack(device, chosen))
        assert removed == len(chosen)
        self.model[device] = [m for m in ids if m not in chosen]

    @rule(device=st.sampled_from(DEVICES), page=st.integers(1, 4))
    def read_in_pages(self, device: Address, page: int) -> None:
        cursor, seen, seqs = 0, [], []
        while True:
            p = self.run(self.queue.read(device, cursor, page, NOW))
            assert len(p.items) <= page
            assert p.cursor >= cursor
            seqs += [i.seq for i in p.items]
            seen += [i.envelope.message_id for i in p.items]
            cursor = p.cursor
            if not p.more:
                break
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert seen == self.model[device]

    @invariant()
    def reading_everything_matches_model(self) -> None:
        for device in DEVICES:
            page = self.run(self.queue.read(device, 0, 1000, NOW))
            assert [i.envelope.message_id for i in page.items] == self.model[device]

    def teardown(self) -> None:
        self.run(self.queue.__aexit__(None, None, None))
        self.loop.close()
        self.dir.cleanup()


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)


async def test_seqs_are_never_reused_after_acks_and_reopen(tmp_path: Path) -> None:
    async with SqliteQueue(tmp_path / "q.db", clock=FakeClock(NOW)) as q:
        first = [env() for _ in range(5)]
        res = await q.append(first, [NOW + 1000] * 5, BIG)
        top = max(r.seq for r in res)
        assert await q.ack(BOB, [e.message_id for e in first]) == 5
        assert await q.depth(BOB) == (0, 0)
        res = await q.append([env()], [NOW + 1000], BIG)
        assert res[0].seq == top + 1
        top = res[0].seq
        await q.ack(BOB, [e.envelope.message_id for e in (await q.read(BOB, 0, 10, NOW)).items])
    # the high-water mark survives a restart
    async with SqliteQueue(tmp_path / "q.db", clock=FakeClock(NOW)) as q:
        res = await q.append([env(), env()], [NOW + 1000] * 2, BIG)
        assert [r.seq for r in res] == [top + 1, top + 2]
        assert len(await read_all(q, BOB)) == 2


async def test_depth_tracks_appends_acks_and_purges_per_device(tmp_path: Path) -> None:
    async with SqliteQueue(tmp_path / "q.db", clock=FakeClock(NOW)) as q:
        envs = [env(BOB, b"ab"), env(BOB2, b"c"), env(BOB, b"d"), env(BOB2, b"efg")]
        await q.append(envs, [NOW + 10, NOW + 10, NOW + 1000, NOW + 10], BIG)
        assert await q.depth(BOB) == (2, envs[0].size + envs[2].size)
        assert await q.depth(BOB2) == (2, envs[1].size + envs[3].size)
        assert await q.purge_expired(NOW + 100) == 3
        assert await q.depth(BOB) == (1, envs[2].size)
        assert await q.depth(BOB2) == (0, 0)
        assert await q.ack(BOB, [envs[2].message_id, envs[2].message_id]) == 1
        assert await q.depth(BOB) == (0, 0)


async def test_a_failing_append_leaves_no_trace(tmp_path: Path) -> None:
    async with SqliteQueue(tmp_path / "q.db", clock=FakeClock(NOW)) as q:
        # A sender SQLite cannot bind fails the row insert after the first row went in.
        bad = Envelope(b"m" * 16, Address(object(), "a", 1), BOB, b"c")  # type: ignore[arg-type]
        good = env()
        with pytest.raises(sqlite3.Error):
            await q.append([good, bad], [NOW + 1000] * 2, BIG)
        assert await q.depth(BOB) == (0, 0)
        assert await read_all(q, BOB) == []
        res = await q.append([good], [NOW + 1000], BIG)
        assert res[0].outcome is Outcome.STORED
