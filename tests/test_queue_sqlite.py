"""The embedded SQLite queue: the conformance suite plus a Hypothesis state machine."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from relay.clock import FakeClock
from relay.model import Address, Envelope, EnvelopeKey, Outcome, QueueLimits
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
        self.model: dict[Address, list[EnvelopeKey]] = {d: [] for d in DEVICES}
        self.accepted: set[tuple[Address, EnvelopeKey]] = set()
        self.next_id = 0
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
            # Reuse an id accepted for the device, from whichever sender used it. Ids
            # count up (not random), so that every run draws alike (Hypothesis replays).
            old = sorted(k.message_id for (d, k) in self.accepted if d == device)
            self.next_id += 1
            mid = old[0] if reuse and old else self.next_id.to_bytes(16, "big")
            envs.append(Envelope(mid, sender, device, b"c"))
        results = self.run(self.queue.append(envs, [NOW + 10**9] * len(envs), self.limits))
        for e, r in zip(envs, results, strict=True):
            key = (e.recipient, e.key)
            if key in self.accepted:
                assert r.outcome is Outcome.DUPLICATE
            elif len(self.model[e.recipient]) >= self.limits.max_depth:
                assert r.outcome is Outcome.REJECTED and r.limit == "max_queue_depth"
            else:
                assert r.outcome is Outcome.STORED
                self.accepted.add(key)
                self.model[e.recipient].append(e.key)

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
            seen += [i.envelope.key for i in p.items]
            cursor = p.cursor
            if not p.more:
                break
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert seen == self.model[device]

    @invariant()
    def reading_everything_matches_model(self) -> None:
        for device in DEVICES:
            page = self.run(self.queue.read(device, 0, 1000, NOW))
            assert [i.envelope.key for i in page.items] == self.model[device]

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
        assert await q.ack(BOB, [e.key for e in first]) == 5
        assert await q.depth(BOB) == (0, 0)
        res = await q.append([env()], [NOW + 1000], BIG)
        assert res[0].seq == top + 1
        top = res[0].seq
        await q.ack(BOB, [e.envelope.key for e in (await q.read(BOB, 0, 10, NOW)).items])
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
        assert await q.ack(BOB, [envs[2].key, envs[2].key]) == 1
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


#: The queue schema before dedup was keyed by sender (user_version 0), as that code made it.
SCHEMA_0 = """
CREATE TABLE queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    sender_tenant TEXT NOT NULL, sender_user TEXT NOT NULL, sender_device INTEGER NOT NULL,
    content BLOB NOT NULL,
    server_ts INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX queue_device ON queue (tenant, user, device, id);
CREATE UNIQUE INDEX queue_message ON queue (tenant, user, device, message_id);
CREATE INDEX queue_expiry ON queue (expires_at);
CREATE TABLE accepted (
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device, message_id)
) WITHOUT ROWID;
CREATE INDEX accepted_expiry ON accepted (expires_at);
CREATE TABLE depth (
    tenant TEXT NOT NULL, user TEXT NOT NULL, device INTEGER NOT NULL,
    count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (tenant, user, device)
) WITHOUT ROWID;
"""


async def test_a_schema_0_file_keeps_its_ids_after_the_upgrade(tmp_path: Path) -> None:
    """Ids accepted before the upgrade stay duplicates; queued rows take their row's sender."""
    path = tmp_path / "old.db"
    queued, acked = env(content=b"queued"), env(content=b"acked")
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_0)
    s = queued.sender
    conn.execute(
        "INSERT INTO queue (tenant, user, device, message_id, sender_tenant, sender_user,"
        " sender_device, content, server_ts, expires_at, size)"
        " VALUES ('t', 'bob', 1, ?, ?, ?, ?, ?, ?, ?, ?)",
        (queued.message_id, s.tenant, s.user, s.device, queued.content, NOW, NOW + 10**6,
         queued.size),
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO accepted VALUES ('t', 'bob', 1, ?, ?)",
        [(queued.message_id, NOW + 10**6), (acked.message_id, NOW + 10**6)],
    )
    conn.execute("INSERT INTO depth VALUES ('t', 'bob', 1, 1, ?)", (queued.size,))
    conn.commit()
    conn.close()
    mallory = Address("t", "mallory", 1)
    async with SqliteQueue(path, clock=FakeClock(NOW)) as q:
        res = await q.append([queued, acked], [NOW + 10**6] * 2, BIG)
        assert [r.outcome for r in res] == [Outcome.DUPLICATE, Outcome.DUPLICATE]
        # The queued id now belongs to its row's sender: another sender's copy is stored.
        other = Envelope(queued.message_id, mallory, BOB, b"other")
        # The acked id's sender is unknown: it stays a duplicate for everyone, until expiry.
        blind = Envelope(acked.message_id, mallory, BOB, b"blind")
        res = await q.append([other, blind], [NOW + 10**6] * 2, BIG)
        assert [r.outcome for r in res] == [Outcome.STORED, Outcome.DUPLICATE]
        got = await read_all(q, BOB)
        assert [(e.sender, e.content) for e in got] == [(s, b"queued"), (mallory, b"other")]
        assert await q.ack(BOB, [queued.key]) == 1
        assert [e.content for e in await read_all(q, BOB)] == [b"other"]
        assert await q.depth(BOB) == (1, other.size)
    async with SqliteQueue(path, clock=FakeClock(NOW + 10**6)) as q:  # the records expired
        res = await q.append([blind], [NOW + 2 * 10**6], BIG)
        assert res[0].outcome is Outcome.STORED
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone() == (2,)
    indexes = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "queue_message" not in indexes and "queue_key" in indexes
    check.close()
