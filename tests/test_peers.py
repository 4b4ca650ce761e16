"""Unit tests of what the core believes of peer nodes (relay.core.peers), fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.clock import FakeClock
from relay.config import LimitsConfig
from relay.core.delivery import Relay
from relay.core.peers import REPOLL_BURST, REPOLL_REFILL_MS, TokenBucket
from relay.core.presence_local import LocalPresence
from relay.core.sessions import QueueEmpty, Session
from relay.errors import InvalidArgument, PermissionDenied, SessionDisplaced
from relay.metrics import RelayMetrics
from relay.model import Address
from relay.stores.sqlite_queue import SqliteQueue
from tests.test_core import FakeIdentities

BOB = Address("t", "bob", 1)
METRICS: dict[Relay, RelayMetrics] = {}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def presence() -> LocalPresence:
    return LocalPresence()


@pytest.fixture
async def relay(tmp_path: Path, clock: FakeClock, presence: LocalPresence) -> AsyncIterator[Relay]:
    identities = FakeIdentities()
    identities.keys[BOB] = b"b" * 32
    metrics = RelayMetrics()
    async with SqliteQueue(tmp_path / "q.db", clock=clock) as queue:
        relay = Relay(
            queue=queue,
            identities=identities,
            clock=clock,
            limits=LimitsConfig(),
            metrics=metrics,
            presence=presence,
        )
        METRICS[relay] = metrics
        yield relay
        del METRICS[relay]


def refused(relay: Relay, reason: str) -> float:
    """relay_link_refused_total{reason} of the relay's metrics."""
    value = METRICS[relay].registry.get_sample_value("relay_link_refused_total", {"reason": reason})
    return value or 0.0


async def open_bob(relay: Relay) -> Session:
    bob = await relay.open_session(BOB, receive=True)
    events = bob.events()
    assert isinstance(await anext(events), QueueEmpty)
    await events.aclose()
    return bob


async def test_a_displace_beyond_the_epoch_in_presence_is_ignored(relay: Relay) -> None:
    bob = await open_bob(relay)
    for forged in (bob.epoch + 1, 2**63, 2**64 - 1):
        assert not await relay.peers.displace("relay-2", BOB, forged)
    assert relay.sessions.get(BOB) is bob and bob.end_error is None
    assert refused(relay, "displace_epoch") == 3
    # Older or equal claims do nothing either (nothing older to end), and are not suspicious.
    assert not await relay.peers.displace("relay-2", BOB, bob.epoch)
    assert refused(relay, "displace_epoch") == 3


async def test_a_displace_by_the_session_presence_holds_ends_the_old_one(
    relay: Relay, presence: LocalPresence, clock: FakeClock
) -> None:
    bob = await open_bob(relay)
    newer, _ = await presence.claim(BOB, "relay-2", clock.now_ms())  # another node's claim
    assert await relay.peers.displace("relay-2", BOB, newer)
    assert relay.sessions.get(BOB) is None
    assert isinstance(bob.end_error, SessionDisplaced)
    assert bob.end_error.metadata["session_epoch"] == str(newer)


async def test_an_overtaken_displace_still_ends_an_older_session(
    relay: Relay, presence: LocalPresence, clock: FakeClock
) -> None:
    bob = await open_bob(relay)
    middle, _ = await presence.claim(BOB, "relay-2", clock.now_ms())
    newest, _ = await presence.claim(BOB, "relay-3", clock.now_ms())
    assert middle < newest
    assert await relay.peers.displace("relay-2", BOB, middle)  # relay-3 told relay-2 only
    assert bob.displaced


async def test_a_displace_without_an_entry_in_presence_is_ignored(
    relay: Relay, presence: LocalPresence
) -> None:
    bob = await open_bob(relay)
    await presence.release(BOB, "relay-1", bob.epoch)
    assert not await relay.peers.displace("relay-2", BOB, bob.epoch + 1)
    assert not bob.displaced and refused(relay, "displace_epoch") == 1


async def test_repoll_all_is_rate_limited_per_peer(relay: Relay, clock: FakeClock) -> None:
    bob = await open_bob(relay)
    told = [relay.peers.repoll_all("relay-2") for _ in range(REPOLL_BURST + 10)]
    assert told == [True] * REPOLL_BURST + [False] * 10
    assert refused(relay, "repoll_rate") == 10
    assert relay.peers.repoll_all("relay-3")  # another peer has its own budget
    clock.advance(REPOLL_REFILL_MS)
    assert relay.peers.repoll_all("relay-2")
    assert not relay.peers.repoll_all("relay-2")
    assert bob.end_error is None


def test_token_bucket_refills_up_to_its_burst_and_ignores_a_clock_stepping_back() -> None:
    bucket = TokenBucket(2, 1000, 0)
    assert [bucket.take(0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(-50_000)  # stepped back: earns nothing
    assert bucket.take(1000)
    assert [bucket.take(100_000) for _ in range(3)] == [True, True, False]


async def test_an_authenticated_peer_speaks_only_for_its_own_node(relay: Relay) -> None:
    peers = relay.peers
    assert peers.admit("relay-2", "relay-2", authenticated=True) == "relay-2"
    with pytest.raises(PermissionDenied):
        peers.admit("relay-2", "relay-3", authenticated=True)
    with pytest.raises(PermissionDenied):
        peers.admit("relay-2", None, authenticated=True)  # a certificate naming no node
    assert refused(relay, "peer_identity") == 2
    assert peers.admit("relay-2", None, authenticated=False) == "relay-2"  # plaintext
    with pytest.raises(InvalidArgument):
        peers.admit("", None, authenticated=False)
