"""The direct path of the relay core: deliver first, store only what is not acked in time.

Real sessions and the real SQLite queue; the recipient is a task that reads its session
and acks (or not) the way a test tells it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.clock import SystemClock
from relay.config import LimitsConfig
from relay.core.delivery import Relay, SendOutcome
from relay.core.direct import DirectBatch, DirectWait
from relay.core.sendorder import SendOrder
from relay.core.sessions import Deliver, Session
from relay.metrics import RelayMetrics
from relay.model import Address, Envelope, EnvelopeKey, Outcome, QueueLimits
from relay.stores.sqlite_queue import SqliteQueue
from tests.test_core import FakeIdentities

ALICE = Address("t", "alice", 1)
CAROL = Address("t", "carol", 1)
BOB = Address("t", "bob", 1)


class CountingQueue:
    """The SQLite queue, counting appended envelopes and queue acks; appends may be held."""

    def __init__(self, inner: SqliteQueue) -> None:
        self.inner = inner
        self.appended: list[bytes] = []
        self.acked: list[bytes] = []
        self.hold: asyncio.Event | None = None
        self.appending = asyncio.Event()
        self.acking = asyncio.Event()

    async def append(self, envelopes, expires_at_ms, limits):  # type: ignore[no-untyped-def]
        self.appending.set()
        if self.hold is not None:
            await self.hold.wait()
        self.appended += [e.message_id for e in envelopes]
        return await self.inner.append(envelopes, expires_at_ms, limits)

    async def ack(self, device: Address, keys: Sequence[EnvelopeKey]) -> int:
        self.acked += [k.message_id for k in keys]
        removed = await self.inner.ack(device, keys)
        self.acking.set()
        return removed

    async def until_acked(self, mid: bytes) -> None:
        """Wait until ``mid`` has been acked in the queue."""
        while mid not in self.acked:
            self.acking.clear()
            await asyncio.wait_for(self.acking.wait(), 10)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@dataclass
class Reader:
    """A recipient device: reads its session, records first deliveries, acks by policy."""

    relay: Relay
    session: Session
    ack: bool = True
    seen: list[bytes] = field(default_factory=list)
    acked: set[bytes] = field(default_factory=set)
    got: asyncio.Event = field(default_factory=asyncio.Event)
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    #: Cleared: the device stops pulling events (its stream stalls) until it is set.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.flowing.set()

    async def run(self, history: list[bytes]) -> None:
        async for event in self.session.events():
            await self.flowing.wait()
            if not isinstance(event, Deliver):
                self.caught_up.set()  # QueueEmpty
                continue
            ids = [e.message_id for e in event.envelopes]
            for mid in ids:
                if mid not in history:
                    history.append(mid)
            self.seen += ids
            self.got.set()
            if self.ack:
                self.acked.update(ids)
                await self.relay.ack(self.session, ids)


@contextlib.asynccontextmanager
async def reading(
    relay: Relay, device: Address, history: list[bytes], *, ack: bool = True
) -> AsyncIterator[Reader]:
    """A receiving session of ``device`` read by a Reader until the block ends."""
    async with relay.session(device, receive=True) as session:
        reader = Reader(relay, session, ack=ack)
        task = asyncio.create_task(reader.run(history))
        try:
            yield reader
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def registered() -> FakeIdentities:
    """Identity keys of ALICE, BOB and CAROL (the devices of these tests)."""
    identities = FakeIdentities()
    for who in (ALICE, BOB, CAROL):
        identities.keys[who] = os.urandom(32)
    return identities


@contextlib.asynccontextmanager
async def core(
    direct_ack_ms: int = 1000, **limits: int
) -> AsyncIterator[tuple[Relay, CountingQueue]]:
    with tempfile.TemporaryDirectory() as tmp:
        async with SqliteQueue(Path(tmp) / "q.db") as sqlite:
            queue = CountingQueue(sqlite)
            relay = Relay(
                queue=queue,  # type: ignore[arg-type]
                identities=registered(),
                clock=SystemClock(),
                limits=LimitsConfig(direct_ack_ms=direct_ack_ms, **limits),  # type: ignore[arg-type]
                metrics=RelayMetrics(),
            )
            yield relay, queue


def env(sender: Address = ALICE, to: Address = BOB, content: bytes = b"c") -> Envelope:
    return Envelope(os.urandom(16), sender, to, content)


async def send(relay: Relay, session: Session, *envs: Envelope) -> list[SendOutcome]:
    return await relay.send(session.address, list(envs), session)


async def until_seen(reader: Reader, mid: bytes) -> None:
    while mid not in reader.seen:
        reader.got.clear()
        await asyncio.wait_for(reader.got.wait(), 10)


async def stored_ids(relay: Relay, queue: CountingQueue, device: Address) -> list[bytes]:
    page = await queue.inner.read(device, 0, 1000, SystemClock().now_ms())
    return [i.envelope.message_id for i in page.items]


async def test_an_online_recipient_gets_everything_direct() -> None:
    """Every envelope to an online device that acks in time is answered DELIVERED: never
    appended, no queue ack. The stream's first one to it waits for a queue read of bob's
    session (whatever is stored from before comes first), the next ones for nothing."""
    async with core() as (relay, queue), relay.session(ALICE, receive=True) as alice:
        history: list[bytes] = []
        async with reading(relay, BOB, history):
            first = env()
            (out,) = await send(relay, alice, first)
            assert out.outcome is Outcome.DELIVERED
            second = [env() for _ in range(5)]
            outs = await send(relay, alice, *second)
            assert [o.outcome for o in outs] == [Outcome.DELIVERED] * 5
            assert queue.appended == []
            assert queue.acked == []
            assert history == [first.message_id, *(e.message_id for e in second)]
        assert await stored_ids(relay, queue, BOB) == []


async def test_no_ack_in_time_means_stored_and_delivered_again_later() -> None:
    async with (
        core(direct_ack_ms=30) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history) as bob:
            first = env()
            await send(relay, alice, first)
            await until_seen(bob, first.message_id)
            bob.ack = False  # reads, never acks
            silent = env()
            (out,) = await send(relay, alice, silent)
            assert out.outcome is Outcome.STORED
            assert silent.message_id in bob.seen  # it was pushed before it was stored
            assert queue.appended[-1] == silent.message_id
        assert await stored_ids(relay, queue, BOB) == [silent.message_id]
        async with reading(relay, BOB, history) as again:
            await until_seen(again, silent.message_id)


async def test_an_ending_session_stores_its_direct_envelopes_at_once() -> None:
    """With a 60 s ack window, a session that ends answers its sends STORED right away."""
    async with (
        core(direct_ack_ms=60_000) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history) as bob:
            first = env()
            await send(relay, alice, first)
            await until_seen(bob, first.message_id)
            bob.ack = False
            pending = asyncio.create_task(send(relay, alice, env(), env()))
            while len(bob.seen) < 3:
                bob.got.clear()
                await asyncio.wait_for(bob.got.wait(), 10)
            assert not pending.done()
        outs = await asyncio.wait_for(pending, 5)  # the session closed with the block
        assert [o.outcome for o in outs] == [Outcome.STORED] * 2
        assert len(await stored_ids(relay, queue, BOB)) == 2


async def test_an_ack_that_comes_while_it_is_stored_drops_the_stored_copy() -> None:
    async with (
        core(direct_ack_ms=20) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history) as bob:
            first = env()
            await send(relay, alice, first)
            await until_seen(bob, first.message_id)
            bob.ack = False
            late = env()
            queue.hold, queue.appending = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(send(relay, alice, late))
            await asyncio.wait_for(queue.appending.wait(), 5)  # timed out, now storing
            await relay.ack(bob.session, [late.message_id])
            queue.hold.set()
            (out,) = await task
            assert out.outcome is Outcome.STORED
        assert late.message_id in queue.acked
        assert await stored_ids(relay, queue, BOB) == []


async def test_a_full_session_sends_to_the_store() -> None:
    """Past max_session_inflight_envelopes pushed and unacked, the next envelope to that
    session (here from another sender) is stored at once instead of held."""
    async with (
        core(direct_ack_ms=10_000, max_session_inflight_envelopes=3) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
        relay.session(CAROL, receive=True) as carol,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history) as bob:
            for sender in (alice, carol):  # prove both pairs
                first = env(sender.address)
                (out,) = await send(relay, sender, first)
                assert out.outcome is Outcome.DELIVERED
            bob.ack = False
            held = [asyncio.create_task(send(relay, alice, env())) for _ in range(3)]
            while len(bob.seen) < 5:
                bob.got.clear()
                await asyncio.wait_for(bob.got.wait(), 10)
            over = env(CAROL)
            (out,) = await asyncio.wait_for(send(relay, carol, over), 5)
            assert out.outcome is Outcome.STORED
            assert over.message_id in await stored_ids(relay, queue, BOB)
            assert not any(t.done() for t in held)
            await relay.ack(bob.session, bob.seen[2:5])
            outs = [o for t in held for o in await t]
            assert [o.outcome for o in outs] == [Outcome.DELIVERED] * 3


async def test_a_stored_envelope_waits_for_the_fate_of_the_one_before_it() -> None:
    """E1 is pushed direct to a session that never writes it; E2 (session full) takes the
    store path at once. E2 must not be appended before E1 is: when the session ends
    unwritten, E1 is stored first and the next session gets E1, E2."""
    async with (
        core(direct_ack_ms=60_000, max_session_inflight_envelopes=1) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history):
            (out,) = await send(relay, alice, env())
            assert out.outcome is Outcome.DELIVERED
        async with relay.session(BOB, receive=True):  # attached, never read
            e1, e2 = env(), env()
            one = asyncio.create_task(send(relay, alice, e1))
            two = asyncio.create_task(send(relay, alice, e2))
            await asyncio.wait([one, two], timeout=0.2)
            assert not two.done()  # it waits for E1's fate, not just for the store
        assert [o.outcome for o in await one] == [Outcome.STORED]
        assert [o.outcome for o in await two] == [Outcome.STORED]
        assert await stored_ids(relay, queue, BOB) == [e1.message_id, e2.message_id]


# -- FIFO across any mix of paths (Hypothesis) ---------------------------------------

Step = tuple[str, int]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 4)),  # a batch from alice or carol
        st.tuples(st.just("await"), st.just(0)),  # wait for every send so far
        st.tuples(st.just("reconnect"), st.integers(0, 2)),  # bob: acks / no acks / away
        st.tuples(st.just("pause"), st.integers(1, 15)),  # ms
        st.tuples(st.just("stall"), st.integers(0, 1)),  # bob stops / starts pulling
    ),
    min_size=1,
    max_size=14,
)


async def scenario(plan: list[Step], old: int) -> None:
    async with (
        core(direct_ack_ms=8, max_session_inflight_envelopes=6) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
        relay.session(CAROL, receive=True) as carol,
    ):
        history: list[bytes] = []
        sent: dict[Address, list[bytes]] = {ALICE: [], CAROL: []}
        tasks: list[asyncio.Task[list[SendOutcome]]] = []
        bob_cm: contextlib.AbstractAsyncContextManager[Reader] | None = reading(relay, BOB, history)
        bob: Reader | None = await bob_cm.__aenter__()
        acked_by_bob: set[bytes] = set()
        if old:
            # Stored by an earlier stream of alice's whose wake-up was lost (another
            # node): bob's session, past its first read, does not know of them.
            await asyncio.wait_for(bob.caught_up.wait(), 10)
            earlier = [env(ALICE) for _ in range(old)]
            await queue.inner.append(earlier, [2**62] * old, QueueLimits(10_000, 2**30))
            sent[ALICE] += [e.message_id for e in earlier]

        async def leave() -> None:
            nonlocal bob_cm, bob
            if bob_cm is not None:
                assert bob is not None
                acked_by_bob.update(bob.acked)
                await bob_cm.__aexit__(None, None, None)
            bob_cm, bob = None, None

        for n, (kind, arg) in enumerate(plan):
            if kind == "send":
                sender = alice if n % 2 == 0 else carol
                batch = [env(sender.address) for _ in range(arg)]
                sent[sender.address] += [e.message_id for e in batch]
                turn = sender.order.turn()  # pipelined: the turn is taken in call order
                tasks.append(
                    asyncio.create_task(relay.send(sender.address, batch, sender, turn=turn))
                )
            elif kind == "await":
                await asyncio.gather(*tasks)
            elif kind == "reconnect":
                await leave()
                if arg < 2:
                    bob_cm = reading(relay, BOB, history, ack=arg == 0)
                    bob = await bob_cm.__aenter__()
            elif kind == "stall":
                if bob is not None:
                    (bob.flowing.clear if arg == 0 else bob.flowing.set)()
            else:
                await asyncio.sleep(arg / 1000)
        outcomes = [o for t in await asyncio.gather(*tasks) for o in t]
        await leave()
        # Durable before ack: what was answered DELIVERED, bob acked.
        acked_now = set(acked_by_bob)
        for o in outcomes:
            assert o.outcome in (Outcome.DELIVERED, Outcome.STORED)
            if o.outcome is Outcome.DELIVERED:
                assert o.message_id in acked_now
        # Everything reaches bob, each sender's envelopes in send order.
        async with reading(relay, BOB, history) as final:
            everything = set(sent[ALICE]) | set(sent[CAROL])
            while not everything <= set(history):
                final.got.clear()
                await asyncio.wait_for(final.got.wait(), 10)
        for sender, ids in sent.items():
            assert [m for m in history if m in set(ids)] == ids, sender
        assert len(history) == len(everything)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(plan=steps, old=st.integers(0, 2))
def test_fifo_per_pair_holds_across_direct_and_stored(plan: list[Step], old: int) -> None:
    """Any mix of pipelined sends, acks, silences, stalls, reconnects and pauses: every
    envelope reaches bob, first deliveries in send order per sender, and DELIVERED was
    only answered for what bob had acked. ``old`` envelopes of alice's wait in bob's queue
    unannounced when alice's stream starts: they still come first."""
    asyncio.run(scenario(plan, old))


@pytest.mark.parametrize("ack_ms", [0])
async def test_direct_path_off_stores_everything(ack_ms: int) -> None:
    async with (
        core(direct_ack_ms=ack_ms) as (relay, queue),
        relay.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history) as bob:
            for _ in range(3):
                e = env()
                (out,) = await send(relay, alice, e)
                assert out.outcome is Outcome.STORED
                await until_seen(bob, e.message_id)
        assert len(queue.appended) == 3


async def test_a_direct_envelope_that_timed_out_unread_is_not_overtaken() -> None:
    """E2 and E3 go direct to a session whose device has stopped pulling; E2's deadline
    passes first and it is stored. When the device pulls again, E3 (still inside its own
    window) must not be delivered before E2's stored copy. (Regression: the session
    dropped the resolved E2 from its pending envelopes and delivered E3 direct, then E2
    from the queue: 3 before 2. Seen in the cluster test of a Redis restart.)"""
    async with (
        core(direct_ack_ms=150) as (relay, _queue),
        relay.session(ALICE, receive=True) as alice,
    ):
        history: list[bytes] = []
        async with reading(relay, BOB, history):
            (out,) = await send(relay, alice, env())
            assert out.outcome is Outcome.DELIVERED  # the pair is clean
        async with relay.session(BOB, receive=True) as session:
            events = session.events()
            assert not isinstance(await anext(events), Deliver)  # QueueEmpty; then a pause
            e2, e3 = env(content=b"2"), env(content=b"3")
            two = asyncio.create_task(send(relay, alice, e2))
            three = asyncio.create_task(send(relay, alice, e3))
            assert [o.outcome for o in await two] == [Outcome.STORED]
            assert not three.done()  # its window began when e2's ended
            got: list[bytes] = []
            while e2.message_id not in got or e3.message_id not in got:
                event = await asyncio.wait_for(anext(events), 10)
                assert isinstance(event, Deliver)
                got += [e.message_id for e in event.envelopes]
                await relay.ack(session, [e.message_id for e in event.envelopes])
            await three
            await events.aclose()
        assert got == [e2.message_id, e3.message_id]


async def test_direct_sends_leave_no_cyclic_garbage() -> None:
    """A wait and its batch free each other by reference counting once a send is
    answered: with the collector off, none of them is left. (They were the relay's main
    cyclic garbage at load, and every collection of it paused all streams.)"""

    def alive() -> int:
        return sum(isinstance(o, (DirectWait, DirectBatch)) for o in gc.get_objects())

    async with (
        core() as (relay, _queue),
        relay.session(ALICE, receive=True) as alice,
        reading(relay, BOB, []),
    ):
        await send(relay, alice, env())
        gc.collect()
        gc.disable()
        try:
            before = alive()
            for _ in range(20):
                outs = await send(relay, alice, env(), env())
                assert [o.outcome for o in outs] == [Outcome.DELIVERED] * 2
            assert alive() == before
        finally:
            gc.enable()


def test_an_ack_reported_while_the_next_envelopes_are_appended_does_not_clean_the_pair() -> None:
    """The ack of the pair's latest stored envelope makes it clean, unless later envelopes
    of the pair are being appended meanwhile: theirs is the ack to wait for. (Regression,
    the cluster's Redis-restart test: the ack of #5 came back while #6 and #7 were being
    appended, their wake-ups were lost to the presence outage, and #8 went direct with
    nothing to follow, ahead of them.)"""
    order = SendOrder(direct=True)
    pair = order.pair(BOB)
    pair.watching, pair.missed = b"5", True
    pair.storing = 1  # #6 dispatched to the store path, its append in flight
    order.acked_stored(BOB, b"5")
    assert not pair.clean and pair.missed
    pair.storing = 0
    order.acked_stored(BOB, b"5")  # no later one: now it is the latest, and acked
    assert pair.clean and not pair.missed
