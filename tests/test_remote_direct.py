"""The direct path across nodes (relay.core.remote): two relay cores, in-memory links.

Both cores share one SQLite queue and one presence (as nodes of a cluster share
Cassandra and Redis); a ``Wire`` carries what one core's links send to the other's
``PeerInbox``, FIFO per direction and asynchronously (``call_soon``), as a node link does.
Real sessions; the recipients are ``Reader`` tasks of tests/test_direct.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from relay.clock import SystemClock
from relay.config import LimitsConfig
from relay.core.delivery import Relay
from relay.core.peers import PeerInbox
from relay.core.presence_local import LocalPresence
from relay.metrics import RelayMetrics
from relay.model import Address, Location, Notice, Offered, Outcome, Pushed
from relay.stores.sqlite_queue import SqliteQueue
from tests.test_direct import (
    ALICE,
    BOB,
    CountingQueue,
    env,
    reading,
    registered,
    send,
    stored_ids,
    until_seen,
)


class SharedPresence(LocalPresence):
    """LocalPresence that, like Redis, locates devices on any node of the test.

    ``gate``: the next ``locate`` waits until it is set (``gated`` says it is waiting).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.gated = asyncio.Event()

    async def locate(self, devices: Sequence[Address]) -> dict[Address, Location]:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.gated.set()
            await gate.wait()
        found = {d: await self.current(d) for d in devices}
        return {d: loc for d, loc in found.items() if loc is not None}


class Wire:
    """In-memory node links between the cores of one test; ``cut`` drops everything."""

    def __init__(self) -> None:
        self.nodes: dict[str, Relay] = {}
        self.cut = False
        #: Offers (direct forwards) and stored forwards to lose before carrying any again.
        self.lose_offers = 0
        self.lose_forwards = 0
        self.carried: list[tuple[str, str, str]] = []  # (from, to, kind)
        self.notices: list[Notice] = []
        self.tasks: set[asyncio.Future[bool]] = set()
        self.presence = SharedPresence()

    def links(self, me: str) -> _Links:
        return _Links(self, me)

    def carry(self, me: str, to: str, kind: str, deliver: Callable[[PeerInbox], object]) -> None:
        if self.cut:
            return
        self.carried.append((me, to, kind))
        asyncio.get_running_loop().call_soon(deliver, self.nodes[to].peers)


class _Links:
    def __init__(self, wire: Wire, me: str) -> None:
        self._wire = wire
        self._me = me

    @property
    def remote(self) -> bool:
        return True

    def forward(self, node_id: str, items: Sequence[Pushed]) -> None:
        if self._wire.lose_forwards:
            self._wire.lose_forwards -= 1
            return
        self._wire.carry(self._me, node_id, "forward", lambda p: p.accept(self._me, items))

    def displace(self, node_id: str, device: Address, epoch: int) -> None:
        def go(p: PeerInbox) -> None:
            task = asyncio.ensure_future(p.displace(self._me, device, epoch))
            self._wire.tasks.add(task)
            task.add_done_callback(self._wire.tasks.discard)

        self._wire.carry(self._me, node_id, "displace", go)

    def offer(self, node_id: str, items: Sequence[Offered]) -> None:
        if self._wire.lose_offers:
            self._wire.lose_offers -= 1
            return
        self._wire.carry(self._me, node_id, "offer", lambda p: p.offer(self._me, items))

    def report(self, node_id: str, notices: Sequence[Notice]) -> None:
        self._wire.notices += notices
        self._wire.carry(self._me, node_id, "notice", lambda p: p.notices(self._me, notices))


@contextlib.asynccontextmanager
async def two_nodes(
    direct_ack_ms: int = 5_000,
) -> AsyncIterator[tuple[Relay, Relay, CountingQueue, Wire]]:
    """Nodes "a" and "b" sharing a queue and presence, linked by a Wire."""
    with tempfile.TemporaryDirectory() as tmp:
        async with SqliteQueue(Path(tmp) / "q.db") as sqlite:
            queue = CountingQueue(sqlite)
            identities = registered()
            presence = SharedPresence()
            wire = Wire()
            wire.presence = presence
            for name in ("a", "b"):
                wire.nodes[name] = Relay(
                    queue=queue,  # type: ignore[arg-type]
                    identities=identities,
                    clock=SystemClock(),
                    limits=LimitsConfig(direct_ack_ms=direct_ack_ms),
                    metrics=RelayMetrics(),
                    node_id=name,
                    presence=presence,
                    links=wire.links(name),
                )
            yield wire.nodes["a"], wire.nodes["b"], queue, wire


async def test_a_recipient_on_another_node_gets_it_direct() -> None:
    """Envelopes to a device on node b go over the link unstored and are answered
    DELIVERED once b reports the device's acks: never appended, in send order."""
    async with two_nodes() as (a, b, queue, wire), a.session(ALICE, receive=True) as alice:
        history: list[bytes] = []
        async with reading(b, BOB, history):
            first = env()
            (out,) = await send(a, alice, first)
            assert out.outcome is Outcome.DELIVERED
            later = [env(content=b"%d" % i) for i in range(5)]
            outs = await send(a, alice, *later)
            assert [o.outcome for o in outs] == [Outcome.DELIVERED] * 5
            assert queue.appended == []
            assert history == [first.message_id, *(e.message_id for e in later)]
            assert len(a.remote) == 0  # every wait settled
            assert ("a", "b", "offer") in wire.carried and ("b", "a", "notice") in wire.carried
        assert await stored_ids(a, queue, BOB) == []


async def test_a_missed_pair_goes_direct_again_once_the_far_node_reports_an_ack() -> None:
    """bob does not ack in time: the envelope is stored and the pair goes to the store
    path; its next envelope is stored and forwarded with report_ack. When bob acks it, b
    reports the ack, and the pair goes direct again."""
    async with (
        two_nodes(direct_ack_ms=100) as (a, b, queue, wire),
        a.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(b, BOB, history, ack=False) as bob:
            e1, e2 = env(), env()
            (out1,) = await send(a, alice, e1)
            assert out1.outcome is Outcome.STORED  # pushed, not acked in time
            (out2,) = await send(a, alice, e2)
            assert out2.outcome is Outcome.STORED  # a missed pair stores at once
            await until_seen(bob, e2.message_id)
            bob.ack = True
            await b.ack(bob.session, [e1.message_id, e2.message_id])
            notice = Notice(BOB, ALICE, e2.message_id, acked=True, direct=False)
            assert notice in wire.notices  # the ack of the stored forward, reported
            e3 = env()
            (out3,) = await send(a, alice, e3)
            assert out3.outcome is Outcome.DELIVERED
            assert queue.appended == [e1.message_id, e2.message_id]
            assert history == [e1.message_id, e2.message_id, e3.message_id]


async def prove(a: Relay, alice: object, queue: CountingQueue) -> None:
    """Make the (alice -> bob) pair clean: one envelope delivered direct and acked."""
    (out,) = await send(a, alice, env())  # type: ignore[arg-type]
    assert out.outcome is Outcome.DELIVERED


async def test_a_session_ending_on_the_far_node_stores_at_once() -> None:
    """With a 60 s ack window, bob's session on b ending answers alice STORED right away
    (b reports it), and bob's next session reads it from the queue."""
    async with (
        two_nodes(direct_ack_ms=60_000) as (a, b, queue, _wire),
        a.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(b, BOB, history) as bob:
            await prove(a, alice, queue)
            bob.ack = False
            pending = env()
            answer = asyncio.create_task(send(a, alice, pending))
            await until_seen(bob, pending.message_id)  # pushed direct, held unacked
            # A notice counts only from the node the envelope went to (rule 1).
            forged = Notice(BOB, ALICE, pending.message_id, acked=True, direct=True)
            a.peers.notices("c", [forged])
            assert refused(a, "notice_late") == 1
            assert not answer.done()
        # the block above ended bob's session
        (out,) = await asyncio.wait_for(answer, 10)
        assert out.outcome is Outcome.STORED
        assert await stored_ids(a, queue, BOB) == [pending.message_id]
        async with reading(b, BOB, history) as again:
            await until_seen(again, pending.message_id)


def refused(relay: Relay, reason: str) -> float:
    """relay_link_refused_total{reason} of ``relay``'s metrics."""
    metrics = relay._metrics
    assert isinstance(metrics, RelayMetrics)
    value = metrics.registry.get_sample_value("relay_link_refused_total", {"reason": reason})
    return value or 0.0


async def test_a_direct_forward_for_another_session_is_refused_at_once() -> None:
    """b offers a direct forward only to the session of the epoch a located (rule 2)."""
    async with two_nodes() as (_a, b, _queue, wire), reading(b, BOB, []) as bob:
        stale = env()
        b.peers.offer("a", [Offered(stale, bob.session.epoch - 1)])
        assert wire.notices == [Notice(BOB, ALICE, stale.message_id, acked=False, direct=True)]
        fresh = env()
        b.peers.offer("a", [Offered(fresh, bob.session.epoch)])
        await until_seen(bob, fresh.message_id)
        assert wire.notices[1:] == [Notice(BOB, ALICE, fresh.message_id, acked=True, direct=True)]
        assert stale.message_id not in bob.seen


async def test_a_cut_link_costs_a_store_write_not_the_envelope() -> None:
    """Nothing comes back over a cut link: the direct envelope waits out its deadline,
    is stored and answered STORED, and bob's next queue read delivers it."""
    async with (
        two_nodes(direct_ack_ms=200) as (a, b, queue, wire),
        a.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(b, BOB, history) as bob:
            await prove(a, alice, queue)
            wire.cut = True
            lost = env()
            (out,) = await send(a, alice, lost)
            assert out.outcome is Outcome.STORED
            assert await stored_ids(a, queue, BOB) == [lost.message_id]
            b.router.reread_all()
            await until_seen(bob, lost.message_id)


async def test_a_first_direct_envelope_waits_for_what_the_queue_holds_from_before() -> None:
    """An envelope alice sent earlier (a unary send: stored) is appended but its forward
    to b is held up (its route is still locating bob). Her receiving stream's first
    envelope to bob goes direct at once (FRESH_READ) and reaches b first; bob's session
    delivers it only after a queue read, which finds the earlier one: FIFO per sender
    device with no store write and no ack coming back first."""
    async with two_nodes() as (a, b, queue, wire), a.session(ALICE, receive=True) as alice:
        history: list[bytes] = []
        async with reading(b, BOB, history):
            old, new = env(), env()
            earlier = asyncio.create_task(a.send(ALICE, [old]))  # no session: stored
            await queue.appending.wait()
            gate = wire.presence.gate = asyncio.Event()
            await wire.presence.gated.wait()  # old's route waits to locate bob
            (out,) = await send(a, alice, new)
            assert out.outcome is Outcome.DELIVERED
            assert history == [old.message_id, new.message_id]
            assert queue.appended == [old.message_id]  # new was pushed, not stored
            gate.set()
            (out_old,) = await earlier
            assert out_old.outcome is Outcome.STORED


async def test_a_lost_direct_forward_is_not_overtaken_by_the_next() -> None:
    """The link loses E2's direct forward (a stream broke, a buffer was dropped) and
    carries E3's: b must not deliver E3 before E2, which a stores at its deadline.
    E3 names the direct envelope of its pair it follows; b has not seen it and refuses
    E3 at once, so a stores it after E2. (Regression: seen in the cluster test of a
    Redis restart, where the link dropped its buffer while presence was down.)"""
    async with (
        two_nodes(direct_ack_ms=200) as (a, b, queue, wire),
        a.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(b, BOB, history) as bob:
            await prove(a, alice, queue)
            e2, e3 = env(content=b"2"), env(content=b"3")
            wire.lose_offers = 1
            two = asyncio.create_task(send(a, alice, e2))
            three = asyncio.create_task(send(a, alice, e3))
            assert [o.outcome for o in await two] == [Outcome.STORED]
            assert [o.outcome for o in await three] == [Outcome.STORED]
            assert queue.appended[-2:] == [e2.message_id, e3.message_id]
            b.router.reread_all()
            await until_seen(bob, e3.message_id)
            assert history[-2:] == [e2.message_id, e3.message_id]


async def test_an_ack_reported_while_the_next_is_appended_does_not_let_the_next_overtake() -> None:
    """E5 goes unacked and is stored (the pair missed); E6 takes the store path and its
    wake-up is lost; bob's ack of E5 is reported back while E6 is still being appended.
    E8 must not go direct ahead of E6. (Regression: that report made the pair clean, E8
    went direct with nothing to follow and bob got E8 before E6; the cluster's
    Redis-restart test, where presence was down and wake-ups were lost.)"""
    async with (
        two_nodes(direct_ack_ms=100) as (a, b, queue, wire),
        a.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(b, BOB, history) as bob:
            await prove(a, alice, queue)
            bob.ack = False
            e5, e6, e8 = env(content=b"5"), env(content=b"6"), env(content=b"8")
            assert [o.outcome for o in await send(a, alice, e5)] == [Outcome.STORED]
            await until_seen(bob, e5.message_id)
            await asyncio.gather(*b.peers.offers._tasks)  # b no longer holds e5 direct
            queue.hold, queue.appending = asyncio.Event(), asyncio.Event()
            wire.lose_forwards = 1  # e6's wake-up
            six = asyncio.create_task(send(a, alice, e6))
            await asyncio.wait_for(queue.appending.wait(), 5)
            await b.ack(bob.session, [e5.message_id])  # reported to a while e6 is appended
            assert Notice(BOB, ALICE, e5.message_id, acked=True, direct=False) in wire.notices
            queue.hold.set()
            assert [o.outcome for o in await six] == [Outcome.STORED]
            bob.ack = True
            await send(a, alice, e8)
            b.router.reread_all()
            await until_seen(bob, e8.message_id)
            await until_seen(bob, e6.message_id)
            assert history.index(e6.message_id) < history.index(e8.message_id)
