"""A Cassandra outage surfaces as relay.errors.Unavailable, never as a driver exception."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from keyserver.cassandra_store import CassandraDeviceDirectory, CassandraPrekeyStore
from relay.clock import FakeClock
from relay.common.cassandra.session import CassandraSession
from relay.config import CassandraConfig
from relay.errors import Unavailable
from relay.model import EnvelopeKey
from relay.stores.cassandra.migrate import migrate
from relay.stores.cassandra.queue import CassandraQueue
from tests.conformance.queue import BIG, BOB, NOW, env

pytestmark = pytest.mark.services


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def down() -> AsyncIterator[CassandraSession]:
    config = CassandraConfig(port=unused_port(), keyspace="relay", request_timeout_seconds=1.0)
    async with CassandraSession(config) as session:  # opens, warns, retries on use
        assert not session.connected
        yield session


async def test_queue_operations_raise_unavailable(down: CassandraSession) -> None:
    queue = CassandraQueue(down, FakeClock(NOW))
    # The first thing an append needs may be the queue layout: either names the cause.
    with pytest.raises(
        Unavailable, match=r"cassandra is unavailable for (append|read the queue layout)"
    ) as info:
        await queue.append([env()], [NOW + 1000], BIG)
    assert info.value.retryable and info.value.__cause__ is not None
    for call in (
        queue.read(BOB, 0, 10, NOW),
        queue.ack(BOB, [EnvelopeKey(BOB, b"x" * 16)]),
        queue.purge_expired(NOW),
    ):
        with pytest.raises(Unavailable):
            await call


async def test_key_stores_raise_unavailable(down: CassandraSession) -> None:
    with pytest.raises(Unavailable):
        await CassandraDeviceDirectory(down).list("acme", "alice")
    with pytest.raises(Unavailable):
        await CassandraPrekeyStore(down).claim_one_time_prekey(BOB)


async def test_migrate_raises_unavailable() -> None:
    with pytest.raises(Unavailable, match=r"connect to 127\.0\.0\.1"):
        await migrate(CassandraConfig(port=unused_port(), request_timeout_seconds=1.0))
