"""RedisPresence against the real Redis: claims, epochs, liveness, heartbeats."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from relay.config import PresenceConfig
from relay.model import Address, Location
from relay.stores.redis_presence import RedisPresence
from tests.conformance.presence import PresenceConformance
from tests.services import REDIS_PORT, REDIS_URL, require

pytestmark = pytest.mark.services
BOB = Address("t", "bob", 1)
NOW = 1_700_000_000_000


@pytest.fixture
async def presence() -> AsyncIterator[RedisPresence]:
    require("Redis", REDIS_PORT)
    cfg = PresenceConfig(
        backend="redis",
        redis_url=REDIS_URL,
        key_prefix=f"t-{uuid.uuid4().hex[:8]}:",
        cache_seconds=0.0,
    )
    async with RedisPresence(cfg) as p:
        yield p


class TestRedisPresence(PresenceConformance):
    """The presence conformance suite on the real Redis (the ``presence`` fixture)."""

    SHARED = True


async def test_claim_locate_release(presence: RedisPresence) -> None:
    assert await presence.heartbeat("n1", "127.0.0.1:1", []) is False  # first beat: new
    assert await presence.heartbeat("n1", "127.0.0.1:1", []) is True
    epoch, prev = await presence.claim(BOB, "n1", NOW)
    assert prev is None and epoch >= NOW * 1000
    assert await presence.locate([BOB]) == {BOB: Location("n1", epoch)}
    await presence.heartbeat("n2", "127.0.0.1:2", [])
    epoch2, prev2 = await presence.claim(BOB, "n2", NOW - 5)  # even with a clock behind
    assert prev2 == Location("n1", epoch) and epoch2 > epoch
    await presence.release(BOB, "n1", epoch)  # stale release: ignored
    assert await presence.locate([BOB]) == {BOB: Location("n2", epoch2)}
    await presence.release(BOB, "n2", epoch2)
    assert await presence.locate([BOB]) == {}
    assert await presence.node_address("n2") == "127.0.0.1:2"
    assert await presence.node_address("nobody") is None


async def test_dead_node_means_offline(presence: RedisPresence) -> None:
    await presence.heartbeat("n1", "127.0.0.1:1", [])
    await presence.claim(BOB, "n1", NOW)
    assert BOB in await presence.locate([BOB])
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.delete(f"{presence._prefix}node:n1")  # the node's liveness key expired
    assert await presence.locate([BOB]) == {}
    await client.aclose()


async def test_heartbeat_restores_entries_after_data_loss(presence: RedisPresence) -> None:
    await presence.heartbeat("n1", "127.0.0.1:1", [])
    epoch, _ = await presence.claim(BOB, "n1", NOW)
    client = aioredis.Redis.from_url(REDIS_URL)
    for key in await client.keys(f"{presence._prefix}*"):
        await client.delete(key)  # as after a Redis restart without persistence
    await client.aclose()
    assert await presence.locate([BOB]) == {}
    assert await presence.heartbeat("n1", "127.0.0.1:1", [(BOB, epoch)]) is False
    assert await presence.locate([BOB]) == {BOB: Location("n1", epoch)}


async def test_heartbeat_never_overwrites_a_newer_session(presence: RedisPresence) -> None:
    await presence.heartbeat("n1", "127.0.0.1:1", [])
    await presence.heartbeat("n2", "127.0.0.1:2", [])
    old, _ = await presence.claim(BOB, "n1", NOW)
    new, _ = await presence.claim(BOB, "n2", NOW)
    await presence.heartbeat("n1", "127.0.0.1:1", [(BOB, old)])
    assert await presence.locate([BOB]) == {BOB: Location("n2", new)}
