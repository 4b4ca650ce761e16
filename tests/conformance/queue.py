"""Conformance suite for ``relay.core.ports.MessageQueue``, run against every backend.

A backend's test module subclasses ``QueueConformance`` and provides a ``queue``
fixture yielding an open, empty store.
"""

from __future__ import annotations

import asyncio
import os

from relay.core.ports import MessageQueue
from relay.model import Address, Envelope, EnvelopeKey, Outcome, QueueLimits

NOW = 1_700_000_000_000
BIG = QueueLimits(max_depth=1_000_000, max_bytes=1 << 40)
ALICE = Address("t", "alice", 1)
BOB = Address("t", "bob", 1)
BOB2 = Address("t", "bob", 2)
MALLORY = Address("t", "mallory", 1)


def env(recipient: Address = BOB, content: bytes = b"x", sender: Address = ALICE) -> Envelope:
    return Envelope(os.urandom(16), sender, recipient, content, server_timestamp_ms=NOW)


async def read_all(queue: MessageQueue, device: Address, now: int = NOW) -> list[Envelope]:
    out: list[Envelope] = []
    cursor = 0
    while True:
        page = await queue.read(device, cursor, 7, now)
        out.extend(i.envelope for i in page.items)
        cursor = page.cursor
        if not page.more:
            return out


class QueueConformance:
    async def test_append_then_read_in_order(self, queue: MessageQueue) -> None:
        envs = [env(content=bytes([i])) for i in range(20)]
        res = await queue.append(envs, [NOW + 10_000] * 20, BIG)
        assert [r.outcome for r in res] == [Outcome.STORED] * 20
        got = await read_all(queue, BOB)
        assert [e.message_id for e in got] == [e.message_id for e in envs]
        assert [e.content for e in got] == [bytes([i]) for i in range(20)]
        assert all(e.sender == ALICE and e.recipient == BOB for e in got)

    async def test_devices_are_separate(self, queue: MessageQueue) -> None:
        a, b = env(BOB), env(BOB2)
        await queue.append([a, b], [NOW + 1000] * 2, BIG)
        assert [e.message_id for e in await read_all(queue, BOB)] == [a.message_id]
        assert [e.message_id for e in await read_all(queue, BOB2)] == [b.message_id]

    async def test_duplicate_is_not_stored_twice_even_after_ack(self, queue: MessageQueue) -> None:
        e = env()
        assert (await queue.append([e], [NOW + 1000], BIG))[0].outcome is Outcome.STORED
        assert (await queue.append([e], [NOW + 1000], BIG))[0].outcome is Outcome.DUPLICATE
        assert await queue.ack(BOB, [e.key]) == 1
        assert (await queue.append([e], [NOW + 1000], BIG))[0].outcome is Outcome.DUPLICATE
        assert await read_all(queue, BOB) == []

    async def test_same_id_for_two_devices_is_two_copies(self, queue: MessageQueue) -> None:
        e = env(BOB)
        e2 = Envelope(e.message_id, ALICE, BOB2, b"y")
        res = await queue.append([e, e2], [NOW + 1000] * 2, BIG)
        assert [r.outcome for r in res] == [Outcome.STORED, Outcome.STORED]

    async def test_ack_removes_only_named_and_is_idempotent(self, queue: MessageQueue) -> None:
        envs = [env() for _ in range(5)]
        await queue.append(envs, [NOW + 1000] * 5, BIG)
        assert await queue.ack(BOB, [envs[1].key, envs[3].key]) == 2
        assert await queue.ack(BOB, [envs[1].key]) == 0
        assert await queue.ack(BOB2, [envs[0].key]) == 0  # not BOB2's
        left = [e.message_id for e in await read_all(queue, BOB)]
        assert left == [envs[i].message_id for i in (0, 2, 4)]

    async def test_depth_limit_names_limit(self, queue: MessageQueue) -> None:
        limits = QueueLimits(max_depth=3, max_bytes=1 << 30)
        res = await queue.append([env() for _ in range(5)], [NOW + 1000] * 5, limits)
        assert [r.outcome for r in res[:3]] == [Outcome.STORED] * 3
        assert [(r.outcome, r.limit) for r in res[3:]] == [
            (Outcome.REJECTED, "max_queue_depth")
        ] * 2
        first = (await queue.read(BOB, 0, 10, NOW)).items[0].envelope.key
        await queue.ack(BOB, [first])
        res = await queue.append([env()], [NOW + 1000], limits)
        assert res[0].outcome is Outcome.STORED

    async def test_bytes_limit_names_limit(self, queue: MessageQueue) -> None:
        one = env(content=b"z" * 1000)
        limits = QueueLimits(max_depth=100, max_bytes=2 * one.size)
        envs = [env(content=b"z" * 1000) for _ in range(3)]
        res = await queue.append(envs, [NOW + 1000] * 3, limits)
        assert [r.outcome for r in res] == [Outcome.STORED, Outcome.STORED, Outcome.REJECTED]
        assert res[2].limit == "max_queue_bytes"

    async def test_expired_are_skipped_and_purged(self, queue: MessageQueue) -> None:
        old, new = env(), env()
        await queue.append([old, new], [NOW + 10, NOW + 10_000], BIG)
        later = NOW + 100
        got = await read_all(queue, BOB, now=later)
        assert [e.message_id for e in got] == [new.message_id]
        assert await queue.purge_expired(later) == 1
        assert [e.message_id for e in await read_all(queue, BOB, now=NOW)] == [new.message_id]

    async def test_cursor_resumes_exactly(self, queue: MessageQueue) -> None:
        envs = [env() for _ in range(10)]
        await queue.append(envs, [NOW + 1000] * 10, BIG)
        page = await queue.read(BOB, 0, 4, NOW)
        assert len(page.items) == 4 and page.more
        assert page.cursor == page.items[-1].seq
        rest = await queue.read(BOB, page.cursor, 100, NOW)
        assert [i.envelope.message_id for i in page.items + rest.items] == [
            e.message_id for e in envs
        ]
        assert not rest.more
        empty = await queue.read(BOB, rest.cursor, 100, NOW)
        assert empty.items == () and empty.cursor == rest.cursor

    async def test_new_items_after_cursor_are_found(self, queue: MessageQueue) -> None:
        a = env()
        await queue.append([a], [NOW + 1000], BIG)
        page = await queue.read(BOB, 0, 10, NOW)
        await queue.ack(BOB, [a.key])
        b = env()
        await queue.append([b], [NOW + 1000], BIG)
        nxt = await queue.read(BOB, page.cursor, 10, NOW)
        assert [i.envelope.message_id for i in nxt.items] == [b.message_id]

    async def test_a_resume_point_finds_everything_appended_after_the_read(
        self, queue: MessageQueue
    ) -> None:
        early = [env(content=b"%d" % i) for i in range(5)]
        await queue.append(early, [NOW + 1000] * 5, BIG)
        page = await queue.read(BOB, 0, 10, NOW)
        assert not page.more
        resume = queue.resume_point(page.cursor)
        assert 0 <= resume <= page.cursor
        late = [env(content=b"late %d" % i) for i in range(3)]
        await queue.append(late, [NOW + 1000] * 3, BIG)
        again = await queue.read(BOB, resume, 100, NOW)
        found = [i.envelope.message_id for i in again.items]
        assert found[-3:] == [e.message_id for e in late]
        assert set(found) <= {e.message_id for e in early + late}
        assert queue.resume_point(0) == 0

    async def test_concurrent_appends_keep_per_call_order(self, queue: MessageQueue) -> None:
        senders = [Address("t", f"s{i}", 1) for i in range(8)]
        batches = [[env(sender=s, content=bytes([n])) for n in range(10)] for s in senders]
        await asyncio.gather(*(queue.append(b, [NOW + 1000] * len(b), BIG) for b in batches))
        got = await read_all(queue, BOB)
        assert len(got) == 80
        for s in senders:
            assert [e.content for e in got if e.sender == s] == [bytes([n]) for n in range(10)]

    async def test_repeated_id_within_one_call_is_a_duplicate(self, queue: MessageQueue) -> None:
        a, b = env(), env()
        again = Envelope(a.message_id, ALICE, BOB, b"other content")
        res = await queue.append([a, b, again, b], [NOW + 1000] * 4, BIG)
        assert [r.outcome for r in res] == [
            Outcome.STORED, Outcome.STORED, Outcome.DUPLICATE, Outcome.DUPLICATE
        ]  # fmt: skip
        got = await read_all(queue, BOB)
        assert [(e.message_id, e.content) for e in got] == [
            (a.message_id, a.content), (b.message_id, b.content)
        ]  # fmt: skip

    async def test_limits_count_earlier_envelopes_of_the_same_call(
        self, queue: MessageQueue
    ) -> None:
        limits = QueueLimits(max_depth=2, max_bytes=1 << 30)
        envs = [env(BOB), env(BOB2), env(BOB), env(BOB2), env(BOB), env(BOB2)]
        res = await queue.append(envs, [NOW + 1000] * 6, limits)
        assert [r.outcome for r in res] == [Outcome.STORED] * 4 + [Outcome.REJECTED] * 2
        # A rejected envelope takes no room; a smaller one after it still fits by bytes.
        big, small = env(content=b"b" * 500), env(content=b"s")
        tight = QueueLimits(max_depth=100, max_bytes=3 * env().size + small.size + 10)
        res = await queue.append([big, small], [NOW + 1000] * 2, tight)
        assert [r.outcome for r in res] == [Outcome.REJECTED, Outcome.STORED]
        assert [e.message_id for e in await read_all(queue, BOB)][-1] == small.message_id

    async def test_interleaved_recipients_keep_call_order_each(self, queue: MessageQueue) -> None:
        envs = [env(BOB if i % 3 else BOB2, content=bytes([i])) for i in range(30)]
        res = await queue.append(envs, [NOW + 1000] * 30, BIG)
        for device in (BOB, BOB2):
            mine = [(e, r) for e, r in zip(envs, res, strict=True) if e.recipient == device]
            seqs = [r.seq for _, r in mine]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            got = await read_all(queue, device)
            assert [e.content for e in got] == [e.content for e, _ in mine]

    async def test_ack_of_many_ids_with_repeats(self, queue: MessageQueue) -> None:
        envs = [env() for _ in range(1200)]
        await queue.append(envs, [NOW + 1000] * 1200, BIG)
        keys = [e.key for e in envs[:1100]]
        unknown = EnvelopeKey(ALICE, os.urandom(16))
        assert await queue.ack(BOB, keys + keys[:50] + [unknown]) == 1100
        assert [e.message_id for e in await read_all(queue, BOB)] == [
            e.message_id for e in envs[1100:]
        ]

    async def test_purge_empties_only_that_device(self, queue: MessageQueue) -> None:
        mine = [env(BOB) for _ in range(5)]
        theirs = [env(BOB2) for _ in range(2)]
        await queue.append(mine + theirs, [NOW + 1000] * 7, BIG)
        assert await queue.ack(BOB, [mine[0].key]) == 1
        assert await queue.purge(BOB) == 4
        assert await read_all(queue, BOB) == []
        assert await queue.ack(BOB, [e.key for e in mine]) == 0  # nothing left to ack
        assert [e.message_id for e in await read_all(queue, BOB2)] == [e.message_id for e in theirs]

    async def test_purge_is_idempotent(self, queue: MessageQueue) -> None:
        assert await queue.purge(BOB) == 0  # a device never seen
        await queue.append([env(), env()], [NOW + 1000] * 2, BIG)
        assert await queue.purge(BOB) == 2
        assert await queue.purge(BOB) == 0
        assert await read_all(queue, BOB) == []

    async def test_concurrent_purges_of_one_device(self, queue: MessageQueue) -> None:
        envs = [env() for _ in range(50)]
        await queue.append(envs, [NOW + 1000] * 50, BIG)
        counts = await asyncio.gather(*(queue.purge(BOB) for _ in range(4)))
        # Each may count what another deleted at the same time, never more than was there.
        assert sum(counts) >= 50 and max(counts) <= 50
        assert await read_all(queue, BOB) == []
        assert await queue.purge(BOB) == 0

    async def test_an_expired_id_may_be_stored_again(self, queue: MessageQueue) -> None:
        """Past its expiry an id no longer dedups (all backends decide it in the core)."""
        e = env()
        assert (await queue.append([e], [NOW - 1], BIG))[0].outcome is Outcome.STORED
        assert await read_all(queue, BOB) == []  # already expired: never delivered
        again = Envelope(e.message_id, ALICE, BOB, b"again")
        assert (await queue.append([again], [NOW + 1000], BIG))[0].outcome is Outcome.STORED
        assert [x.content for x in await read_all(queue, BOB)] == [b"again"]
        assert (await queue.append([again], [NOW + 1000], BIG))[0].outcome is Outcome.DUPLICATE
        assert await queue.ack(BOB, [e.key]) == 1
        assert await read_all(queue, BOB) == []

    async def test_a_queue_works_again_after_a_purge(self, queue: MessageQueue) -> None:
        await queue.append([env(), env()], [NOW + 1000] * 2, BIG)
        await queue.purge(BOB)
        again = env()
        assert (await queue.append([again], [NOW + 1000], BIG))[0].outcome is Outcome.STORED
        assert [e.message_id for e in await read_all(queue, BOB)] == [again.message_id]

    # -- dedup and acks are keyed by (sender, message_id) per recipient -------------------

    async def test_two_senders_of_one_id_are_two_envelopes(self, queue: MessageQueue) -> None:
        """A device that uses another sender's id first does not make that one a duplicate."""
        claim = env(content=b"pre-claim", sender=MALLORY)
        honest = Envelope(claim.message_id, ALICE, BOB, b"honest", server_timestamp_ms=NOW)
        assert (await queue.append([claim], [NOW + 1000], BIG))[0].outcome is Outcome.STORED
        assert (await queue.append([honest], [NOW + 1000], BIG))[0].outcome is Outcome.STORED
        got = await read_all(queue, BOB)
        assert [(e.sender, e.content) for e in got] == [(MALLORY, b"pre-claim"), (ALICE, b"honest")]
        assert {e.message_id for e in got} == {claim.message_id}
        # The same sender resending is still a duplicate, either way round and in one call.
        res = await queue.append([honest, claim], [NOW + 1000] * 2, BIG)
        assert [r.outcome for r in res] == [Outcome.DUPLICATE, Outcome.DUPLICATE]
        third = Envelope(claim.message_id, BOB2, BOB, b"third")
        res = await queue.append([third, third], [NOW + 1000] * 2, BIG)
        assert [r.outcome for r in res] == [Outcome.STORED, Outcome.DUPLICATE]

    async def test_an_ack_removes_only_the_named_sender(self, queue: MessageQueue) -> None:
        one = env(content=b"from alice")
        two = Envelope(one.message_id, MALLORY, BOB, b"from mallory")
        await queue.append([one, two], [NOW + 1000] * 2, BIG)
        assert await queue.ack(BOB, [EnvelopeKey(BOB2, one.message_id)]) == 0  # nobody's
        assert await queue.ack(BOB, [one.key]) == 1
        assert [e.content for e in await read_all(queue, BOB)] == [b"from mallory"]
        assert await queue.ack(BOB, [one.key]) == 0
        # Acked, alice's key stays a duplicate; mallory's is still there to ack.
        assert (await queue.append([one], [NOW + 1000], BIG))[0].outcome is Outcome.DUPLICATE
        assert (await queue.append([two], [NOW + 1000], BIG))[0].outcome is Outcome.DUPLICATE
        assert await queue.ack(BOB, [two.key, one.key]) == 1
        assert await read_all(queue, BOB) == []
