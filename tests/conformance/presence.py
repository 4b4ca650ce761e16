"""Conformance suite for ``relay.core.ports.Presence``, run against every backend.

A backend's test module subclasses ``PresenceConformance`` and provides a ``presence``
fixture yielding an open, empty store (a cache of at most zero seconds). ``SHARED``
says whether the backend is seen by other nodes (Redis) or is one process's own
(``LocalPresence``): only a shared one reports a previous location on another node,
locates devices, and knows other nodes' addresses.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from relay.core.ports import Presence
from relay.model import Address, Location

NOW = 1_700_000_000_000
BOB = Address("t", "bob", 1)
BOB2 = Address("t", "bob", 2)
CAROL = Address("t", "carol", 1)


class PresenceConformance:
    SHARED: ClassVar[bool]

    async def test_epochs_start_at_the_clock_and_only_grow(self, presence: Presence) -> None:
        first, _ = await presence.claim(BOB, "n1", NOW)
        assert first >= NOW * 1000
        second, _ = await presence.claim(BOB, "n1", NOW - 60_000)  # a clock that went back
        third, _ = await presence.claim(BOB, "n2", NOW)
        assert first < second < third

    async def test_current_is_the_newest_claim(self, presence: Presence) -> None:
        assert await presence.current(BOB) is None
        epoch, _ = await presence.claim(BOB, "n1", NOW)
        assert await presence.current(BOB) == Location("n1", epoch)
        newer, previous = await presence.claim(BOB, "n2", NOW)
        assert await presence.current(BOB) == Location("n2", newer)
        if self.SHARED:
            assert previous == Location("n1", epoch)
        else:
            assert previous is None  # one process: there is no other node

    async def test_only_the_current_claim_is_released(self, presence: Presence) -> None:
        old, _ = await presence.claim(BOB, "n1", NOW)
        new, _ = await presence.claim(BOB, "n1", NOW)
        await presence.release(BOB, "n1", old)  # a stale session ending: ignored
        await presence.release(BOB, "n2", new)  # not that node's
        assert await presence.current(BOB) == Location("n1", new)
        await presence.release(BOB, "n1", new)
        assert await presence.current(BOB) is None
        await presence.release(BOB, "n1", new)  # again: nothing happens
        await presence.release(CAROL, "n1", 1)  # never claimed
        again, _ = await presence.claim(BOB, "n1", NOW - 1)
        assert again > new  # epochs grow even across a release

    async def test_devices_are_separate(self, presence: Presence) -> None:
        a, _ = await presence.claim(BOB, "n1", NOW)
        b, _ = await presence.claim(BOB2, "n2", NOW)
        await presence.release(BOB, "n1", a)
        assert await presence.current(BOB) is None
        assert await presence.current(BOB2) == Location("n2", b)

    async def test_a_heartbeat_never_takes_back_a_newer_claim(self, presence: Presence) -> None:
        old, _ = await presence.claim(BOB, "n1", NOW)
        await presence.heartbeat("n1", "127.0.0.1:1", [])
        new, _ = await presence.claim(BOB, "n2", NOW)
        await presence.heartbeat("n1", "127.0.0.1:1", [(BOB, old)])
        assert await presence.current(BOB) == Location("n2", new)
        assert await presence.heartbeat("n1", "127.0.0.1:1", [(BOB, old)]) is True

    async def test_locate_answers_only_for_live_claims(self, presence: Presence) -> None:
        await presence.heartbeat("n1", "127.0.0.1:1", [])
        epoch, _ = await presence.claim(BOB, "n1", NOW)
        await presence.claim(CAROL, "dead-node", NOW)  # no heartbeat: not alive
        found = await presence.locate([BOB, BOB2, CAROL])
        assert set(found) <= {BOB}
        assert found == ({BOB: Location("n1", epoch)} if self.SHARED else {})
        await presence.release(BOB, "n1", epoch)
        assert await presence.locate([BOB]) == {}
        assert await presence.locate([]) == {}

    async def test_node_addresses_come_from_heartbeats(self, presence: Presence) -> None:
        assert await presence.node_address("nobody") is None
        await presence.heartbeat("n1", "127.0.0.1:7001", [])
        expected = "127.0.0.1:7001" if self.SHARED else None
        assert await presence.node_address("n1") == expected

    async def test_concurrent_claims_get_distinct_epochs(self, presence: Presence) -> None:
        results = await asyncio.gather(*(presence.claim(BOB, f"n{i}", NOW) for i in range(8)))
        epochs = [e for e, _ in results]
        assert len(set(epochs)) == 8
        newest = max(range(8), key=lambda i: epochs[i])
        assert await presence.current(BOB) == Location(f"n{newest}", epochs[newest])
