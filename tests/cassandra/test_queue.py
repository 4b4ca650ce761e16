"""CassandraQueue: the queue conformance suite, and what is particular to Cassandra."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.clock import FakeClock
from relay.common.cassandra.session import CassandraSession
from relay.model import Address, Envelope, Outcome, QueueLimits
from relay.stores.cassandra.accepted import AcceptedIds
from relay.stores.cassandra.ids import LAYOUT_VERSION, Layout
from relay.stores.cassandra.layout import (
    DEFAULT_BUCKET_MS,
    SeqSource,
    bucket_of,
    key,
    ms_of,
    seq_at,
)
from relay.stores.cassandra.queue import DEFAULT_FLOOR_LAG_MS, CassandraQueue
from tests.conformance.queue import BIG, BOB, MALLORY, NOW, QueueConformance, env, read_all

pytestmark = pytest.mark.services


class TestCassandraQueue(QueueConformance):
    @pytest.fixture
    def queue(self, fresh: CassandraSession) -> CassandraQueue:
        return CassandraQueue(fresh, FakeClock(NOW))


async def test_half_done_append_is_stored_again(fresh: CassandraSession) -> None:
    """Layout 1 recorded an id before its row; a retry of an append that failed between."""
    queue = CassandraQueue(fresh, FakeClock(NOW))
    queue._layout = Layout(LAYOUT_VERSION, legacy_until_ms=NOW + 10**9)  # as after an upgrade
    e = env()
    # The id was recorded, then the row write failed (the sender got UNAVAILABLE).
    await fresh.execute_batches(AcceptedIds.record([(e, NOW + 1000, 12345)], NOW), op="test")
    assert (await queue.append([e], [NOW + 1000], BIG))[0].outcome is Outcome.STORED
    assert [x.message_id for x in await read_all(queue, BOB)] == [e.message_id]
    assert (await queue.append([e], [NOW + 1000], BIG))[0].outcome is Outcome.DUPLICATE
    assert await queue.ack(BOB, [e.key]) == 1
    assert await read_all(queue, BOB) == []


async def test_racing_appends_of_one_id_are_acked_together(fresh: CassandraSession) -> None:
    nodes = [CassandraQueue(fresh, FakeClock(NOW)) for _ in range(2)]
    e = env()
    results = await asyncio.gather(*(q.append([e], [NOW + 1000], BIG) for q in nodes))
    assert {r[0].outcome for r in results} <= {Outcome.STORED, Outcome.DUPLICATE}
    assert Outcome.STORED in {r[0].outcome for r in results}
    assert await nodes[0].ack(BOB, [e.key]) == 1
    assert await read_all(nodes[1], BOB) == []


async def test_acks_move_the_floor_past_acked_rows(fresh: CassandraSession) -> None:
    clock = FakeClock(NOW)
    queue = CassandraQueue(fresh, clock)
    old = [env() for _ in range(4)]
    res_old = await queue.append(old, [NOW + 10**9] * 4, BIG)
    clock.advance(DEFAULT_FLOOR_LAG_MS + 1000)
    new = [env() for _ in range(6)]
    res_new = await queue.append(new, [NOW + 10**9] * 6, BIG)
    # The newest acked seq (new[0]'s) bounds the floor: LAG below it, past every old row.
    assert await queue.ack(BOB, [e.key for e in old + new[:1]]) == 5
    floor = await queue.floor(BOB)
    assert floor == seq_at(NOW + 1000) - 1
    assert max(r.seq for r in res_old) < floor < res_new[1].seq
    await queue.ack(BOB, [e.key for e in new[1:3]])
    assert await queue.floor(BOB) == floor  # new[2] is not LAG older than itself
    assert [x.message_id for x in await read_all(queue, BOB)] == [e.message_id for e in new[3:]]


async def test_the_floor_follows_the_acked_seqs_not_the_acking_clock(
    fresh: CassandraSession,
) -> None:
    """A node whose clock runs ahead cannot lift the floor over rows still being written.

    (Regression: the floor was capped by the acking node's clock minus 60 s, so a node
    10 minutes ahead put it above the seqs that nodes with a right clock were making.)
    """
    writer = CassandraQueue(fresh, FakeClock(NOW))
    ahead = FakeClock(NOW + 600_000)
    acker = CassandraQueue(fresh, ahead)
    first = env()
    (res,) = await writer.append([first], [NOW + 10**9], BIG)
    assert await acker.ack(BOB, [first.key]) == 1
    assert await writer.floor(BOB) <= seq_at(NOW - DEFAULT_FLOOR_LAG_MS) < res.seq
    late = env()  # written after the ack by the node with the right clock
    await writer.append([late], [NOW + 10**9], BIG)
    assert [x.message_id for x in await read_all(acker, BOB)] == [late.message_id]


async def test_acks_out_of_order_keep_moving_the_floor(fresh: CassandraSession) -> None:
    """An ack whose cap is below the floor still forgets the first live row it deleted.

    (Regression, seen in CI as READ_TOO_MANY_TOMBSTONES after 100k acks: a later ack
    remembered row ``a`` as the first live one; ``a``'s own ack found the floor above its
    cap and returned early, so the deleted ``a`` stayed remembered and every later ack
    skipped the probe, leaving the floor below all of their tombstones.)
    """
    clock = FakeClock(NOW)
    queue = CassandraQueue(fresh, clock)
    rows = []
    for _ in range(3):
        e = env()
        (res,) = await queue.append([e], [NOW + 10**9], BIG)
        rows.append((e, res.seq))
        clock.advance(2 * DEFAULT_FLOOR_LAG_MS)
    (a, _), (b, _), (c, c_seq) = rows
    assert await queue.ack(BOB, [b.key]) == 1  # the probe finds a live: floor just below a
    assert await queue.ack(BOB, [a.key]) == 1  # a's cap is below that floor
    assert await queue.ack(BOB, [c.key]) == 1
    assert await queue.floor(BOB) == seq_at(ms_of(c_seq) - DEFAULT_FLOOR_LAG_MS) - 1


DAY = NOW + 86_400_000  # an expiry hour in the future: registered once


def _count_statements(session: CassandraSession) -> list[int]:
    """Count every request the session sends from now on (statements and batches)."""
    count = [0]
    send = session._session.execute_async

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return send(*args, **kwargs)

    session._session.execute_async = counting
    return count


async def test_an_append_costs_a_few_statements(fresh: CassandraSession) -> None:
    """20 envelopes to one device: 5 requests in two rounds (layout 1 sent 24-32).

    One lookup of the ids, one depth read; one batch of rows and ids, one of expiry
    entries, one counter update. A new bucket or expiry hour costs their registration.
    """
    queue = CassandraQueue(fresh, FakeClock(NOW))
    await queue.append([env()], [DAY], BIG)  # registers the bucket and expiry hour,
    # prepares the statements
    count = _count_statements(fresh)
    for _ in range(3):
        count[0] = 0
        envs = [env(content=b"x" * 200) for _ in range(20)]
        res = await queue.append(envs, [DAY] * 20, BIG)
        assert {r.outcome for r in res} == {Outcome.STORED}
        assert count[0] == 5
    count[0] = 0
    assert (await queue.append(envs[:5], [DAY] * 5, BIG))[0].outcome is Outcome.DUPLICATE
    assert count[0] == 2  # nothing to write
    count[0] = 0
    assert await queue.ack(BOB, [e.key for e in envs]) == 20
    assert count[0] <= 6  # lookup, one batch, counter, the floor's index read and probe


async def test_rows_and_ids_of_a_partition_are_one_batch(fresh: CassandraSession) -> None:
    """Each row's id is in its partition: an id is never found without its row."""
    queue = CassandraQueue(fresh, FakeClock(NOW))
    envs = [env() for _ in range(3)]
    res = await queue.append(envs, [NOW + 10_000] * 3, BIG)
    bucket = bucket_of(res[0].seq, DEFAULT_BUCKET_MS)
    rows = await fresh.execute(
        "SELECT message_id, seqs FROM {ks}.queue_ids WHERE tenant = ? AND user = ?"
        " AND device = ? AND bucket = ?",
        (*key(BOB), bucket),
        op="test",
    )
    assert {(bytes(m), tuple(s)) for m, s in rows} == {
        (e.message_id, (r.seq,)) for e, r in zip(envs, res, strict=True)
    }
    legacy = await fresh.execute("SELECT message_id FROM {ks}.queue_accepted", op="test")
    assert legacy == []  # layout 1 is never written


async def test_the_floor_stays_behind_the_clock(fresh: CassandraSession) -> None:
    clock = FakeClock(NOW)
    queue = CassandraQueue(fresh, clock)
    e = env()
    await queue.append([e], [NOW + 1000], BIG)
    await queue.ack(BOB, [e.key])
    # A write still in flight from another node may land just after the ack.
    assert await queue.floor(BOB) <= seq_at(NOW - DEFAULT_FLOOR_LAG_MS)


async def test_purge_gives_depth_back(fresh: CassandraSession) -> None:
    queue = CassandraQueue(fresh, FakeClock(NOW))
    limits = QueueLimits(max_depth=2, max_bytes=1 << 30)
    await queue.append([env(), env()], [NOW + 10, NOW + 10], limits)
    assert (await queue.append([env()], [NOW + 1000], limits))[0].limit == "max_queue_depth"
    assert await queue.purge_expired(NOW + 100) == 2
    assert await queue.depth(BOB) == (0, 0)
    assert (await queue.append([env()], [NOW + 1000], limits))[0].outcome is Outcome.STORED
    assert await queue.purge_expired(NOW + 100) == 0  # progress is kept


async def test_purge_skips_acked_and_finishes_past_hours(fresh: CassandraSession) -> None:
    queue = CassandraQueue(fresh, FakeClock(NOW))
    acked, kept = env(), env()
    await queue.append([acked, kept], [NOW + 10, NOW + 10], BIG)
    await queue.ack(BOB, [acked.key])
    assert await queue.purge_expired(NOW + 10 * 3_600_000) == 1
    assert await queue.purge_expired(NOW + 20 * 3_600_000) == 0
    hours = await fresh.execute("SELECT hour FROM {ks}.queue_expiry_hours", op="test")
    assert hours == []


async def test_large_envelopes_are_batched_within_limits(fresh: CassandraSession) -> None:
    queue = CassandraQueue(fresh, FakeClock(NOW))
    envs = [env(content=bytes([i]) * 200_000) for i in range(12)]
    res = await queue.append(envs, [NOW + 1000] * 12, BIG)
    assert [r.outcome for r in res] == [Outcome.STORED] * 12
    got = await read_all(queue, BOB)
    assert [x.content for x in got] == [e.content for e in envs]
    assert await queue.depth(BOB) == (12, sum(e.size for e in envs))


async def test_many_devices_in_one_append(fresh: CassandraSession) -> None:
    queue = CassandraQueue(fresh, FakeClock(NOW))
    devices = [Address("t", f"u{i}", 1 + i % 3) for i in range(300)]
    envs = [env(recipient=d) for d in devices]
    res = await queue.append(envs, [NOW + 1000] * len(envs), BIG)
    assert all(r.outcome is Outcome.STORED for r in res)
    for d, e in list(zip(devices, envs, strict=True))[::37]:
        assert [x.message_id for x in await read_all(queue, d)] == [e.message_id]


async def test_two_writers_with_the_same_seq_lose_nothing(fresh: CassandraSession) -> None:
    """Two nodes that make the very same seq for one device keep both envelopes.

    (Regression: with seq alone as the row key, the second write overwrote the first,
    and an acknowledged envelope vanished.)
    """
    nodes = [CassandraQueue(fresh, FakeClock(NOW)) for _ in range(2)]
    for node in nodes:
        node._seqs = SeqSource(FakeClock(NOW), writer=7)  # force a collision
    a, b = env(content=b"from node a"), env(content=b"from node b")
    (ra,), (rb,) = await asyncio.gather(
        nodes[0].append([a], [NOW + 10_000], BIG), nodes[1].append([b], [NOW + 10_000], BIG)
    )
    assert ra.seq == rb.seq and ra.outcome is rb.outcome is Outcome.STORED
    got = {x.content for x in await read_all(nodes[0], BOB)}
    assert got == {b"from node a", b"from node b"}
    assert await nodes[0].ack(BOB, [a.key]) == 1  # acks one, not its twin
    assert [x.content for x in await read_all(nodes[1], BOB)] == [b"from node b"]


def test_writers_make_different_seqs_in_one_millisecond() -> None:
    clock = FakeClock(NOW)
    one, two = SeqSource(clock), SeqSource(clock)
    while two._writer == one._writer:
        two = SeqSource(clock)
    seqs_one = [one.next() for _ in range(100)]
    seqs_two = [two.next() for _ in range(100)]
    assert seqs_one == sorted(seqs_one) and len(set(seqs_one)) == 100
    assert not set(seqs_one) & set(seqs_two)


async def test_one_id_from_two_senders_costs_no_more_statements(fresh: CassandraSession) -> None:
    """Keys by (sender, message_id): the same 5 + 2 + 6 requests as with distinct ids."""
    queue = CassandraQueue(fresh, FakeClock(NOW))
    await queue.append([env()], [DAY], BIG)  # registers the bucket and expiry hour
    count = _count_statements(fresh)
    alice = [env(content=b"a") for _ in range(10)]
    mallory = [Envelope(e.message_id, MALLORY, BOB, b"m") for e in alice]
    res = await queue.append(mallory + alice, [DAY] * 20, BIG)
    assert {r.outcome for r in res} == {Outcome.STORED}
    assert count[0] == 5
    count[0] = 0
    res = await queue.append(alice[:3] + mallory[:2], [DAY] * 5, BIG)
    assert {r.outcome for r in res} == {Outcome.DUPLICATE}
    assert count[0] == 2
    count[0] = 0
    assert await queue.ack(BOB, [e.key for e in alice]) == 10
    assert count[0] <= 6
    got = await read_all(queue, BOB)
    assert [x.content for x in got][1:] == [b"m"] * 10  # the first is the warm-up's
    assert {x.sender for x in got[1:]} == {MALLORY}
