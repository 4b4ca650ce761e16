"""Dedup and acks keyed by (sender, message_id) per recipient: no pre-claims, no foreign acks.

A device that learns (or guesses) the message id another sender will use must not be
able to make that sender's envelope a duplicate by sending first, nor have it removed
by an ack of its own envelope of that id. In the core on the SQLite queue, then end to
end over gRPC.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from relay.clock import FakeClock
from relay.common.convert import address_to_pb
from relay.config import LimitsConfig
from relay.core.delivery import Relay
from relay.core.direct import DirectBatch, WaitState
from relay.core.sessions import Deliver, QueueEmpty, SessionEvent
from relay.metrics import RelayMetrics
from relay.model import Address, Envelope, Outcome
from relay.stores.sqlite_queue import SqliteQueue
from relaypb.relay.v1 import relay_pb2
from tests.conftest import Servers
from tests.support import connect, envelope, register
from tests.test_core import FakeIdentities

ALICE = Address("t", "alice", 1)
MALLORY = Address("t", "mallory", 1)
BOB = Address("t", "bob", 1)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    identities = FakeIdentities()
    for device in (ALICE, MALLORY, BOB):
        identities.keys[device] = device.user.encode() * 4
    clock = FakeClock()
    async with SqliteQueue(tmp_path / "q.db", clock=clock) as queue:
        yield Relay(
            queue=queue,
            identities=identities,
            clock=clock,
            limits=LimitsConfig(session_repoll_seconds=3600),
            metrics=RelayMetrics(),
        )


def _from(sender: Address, message_id: bytes, content: bytes) -> Envelope:
    return Envelope(message_id, sender, BOB, content)


async def _deliveries(events: AsyncIterator[SessionEvent], count: int) -> list[Envelope]:
    out: list[Envelope] = []
    while len(out) < count:
        event = await anext(events)
        if isinstance(event, Deliver):
            out += event.envelopes
    return out


async def test_a_pre_claimed_id_still_stores_and_delivers_the_honest_envelope(
    relay: Relay,
) -> None:
    mid = os.urandom(16)
    (claim,) = await relay.send(MALLORY, [_from(MALLORY, mid, b"pre-claim")])
    (honest,) = await relay.send(ALICE, [_from(ALICE, mid, b"honest")])
    assert claim.outcome is honest.outcome is Outcome.STORED
    # The same sender resending is still a duplicate.
    (again,) = await relay.send(ALICE, [_from(ALICE, mid, b"honest")])
    assert again.outcome is Outcome.DUPLICATE
    session = await relay.open_session(BOB, receive=True)
    events = session.events()
    got = await _deliveries(events, 2)
    assert [(e.sender, e.content) for e in got] == [(MALLORY, b"pre-claim"), (ALICE, b"honest")]
    assert isinstance(await anext(events), QueueEmpty)
    # The device acks the id once: both envelopes it was given with it go.
    assert await relay.ack(session, [mid]) == 2
    await events.aclose()
    await relay.close_session(session)
    later = await relay.open_session(BOB, receive=True)
    assert isinstance(await anext(later.events()), QueueEmpty)


async def test_an_ack_removes_only_the_senders_delivered_with_that_id(relay: Relay) -> None:
    """An envelope not yet delivered in the session stays, though its id was acked."""
    mid = os.urandom(16)
    await relay.send(MALLORY, [_from(MALLORY, mid, b"mine")])
    session = await relay.open_session(BOB, receive=True)
    events = session.events()
    (first,) = await _deliveries(events, 1)
    assert first.sender == MALLORY
    assert isinstance(await anext(events), QueueEmpty)
    # Stored (and pushed to the session), not yet delivered: the device has not seen it.
    (honest,) = await relay.send(ALICE, [_from(ALICE, mid, b"honest")])
    assert honest.outcome is Outcome.STORED
    assert await relay.ack(session, [mid]) == 1  # mallory's only
    (second,) = await _deliveries(events, 1)
    assert (second.sender, second.content) == (ALICE, b"honest")
    assert await relay.ack(session, [mid]) == 1
    assert await relay.ack(session, [os.urandom(16)]) == 0  # never delivered here: ignored
    await events.aclose()


async def test_direct_offers_of_one_id_from_two_senders_are_two_waits(relay: Relay) -> None:
    mid = os.urandom(16)
    session = await relay.open_session(BOB, receive=True)
    events = session.events()
    assert isinstance(await anext(events), QueueEmpty)
    batch = DirectBatch()
    envs = [_from(MALLORY, mid, b"m"), _from(ALICE, mid, b"a")]
    waits = [batch.add(mid, len(e.content), e.sender) for e in envs]
    assert all(session.offer_direct(e, w) for e, w in zip(envs, waits, strict=True))
    assert not session.offer_direct(envs[1], batch.add(mid, 1, ALICE))  # the same key
    assert [e.sender for e in await _deliveries(events, 2)] == [MALLORY, ALICE]
    assert await relay.ack(session, [mid]) == 0  # nothing stored
    assert [w.state for w in waits] == [WaitState.ACKED, WaitState.ACKED]
    for w in waits:
        session.settle(w)
    await events.aclose()


@pytest.mark.integration
async def test_over_grpc_a_pre_claim_does_not_drop_the_honest_message(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    mallory = await register(servers.keys_address, "mallory")
    bob = await register(servers.keys_address, "bob")
    mid = os.urandom(16)
    m = await connect(channel, mallory, receive=False)
    a = await connect(channel, alice, receive=False)
    (claim,) = await m.send(envelope(bob.address, b"pre-claim", message_id=mid))
    (honest,) = await a.send(envelope(bob.address, b"honest", message_id=mid))
    assert claim.outcome == honest.outcome == relay_pb2.OUTCOME_STORED
    (again,) = await a.send(envelope(bob.address, b"honest", message_id=mid))
    assert again.outcome == relay_pb2.OUTCOME_DUPLICATE
    b = await connect(channel, bob)
    got = await b.until_queue_empty()
    assert [(e.sender, e.content) for e in got] == [
        (address_to_pb(mallory.address), b"pre-claim"),
        (address_to_pb(alice.address), b"honest"),
    ]
    assert {e.message_id for e in got} == {mid}
    await b.ack(mid)
    # A send after the ack on the same stream orders the ack before the reconnect.
    await b.send(envelope(alice.address, b"sync"))
    await b.close()
    b2 = await connect(channel, bob)
    assert await b2.until_queue_empty() == []
    (after,) = await a.send(envelope(bob.address, b"honest", message_id=mid))
    assert after.outcome == relay_pb2.OUTCOME_DUPLICATE  # still, after the ack
    for s in (a, m, b2):
        await s.close()
