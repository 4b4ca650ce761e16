"""A Cassandra outage surfaces as relay.errors.Unavailable, never as a driver exception."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionShutdown

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


async def test_connect_retries_once_after_the_drivers_crc_bug(
    cassandra_config: CassandraConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PYTHON-1337: a frame-header CRC mismatch while connecting is retried, once."""
    import relay.common.cassandra.session as module

    real = module.build_cluster
    built: list[object] = []
    always = [False]

    class Flaky:
        def connect(self) -> object:
            bug = ConnectionShutdown(
                'CRC mismatch on header 85dbe7. Received 40000", computed 86fbb.'
            )
            raise NoHostAvailable("Unable to connect to any servers", {"127.0.0.1:9042": bug})

        def shutdown(self) -> None:
            pass

    def build(config: CassandraConfig) -> object:
        built.append(config)
        return Flaky() if len(built) == 1 or always[0] else real(config)

    monkeypatch.setattr(module, "build_cluster", build)
    async with CassandraSession(cassandra_config) as session:
        await session.connect()
        assert session.connected and len(built) == 2
    built.clear()
    always[0] = True  # every attempt hits the bug
    async with CassandraSession(cassandra_config) as session:
        with pytest.raises(Unavailable, match="CRC mismatch"):
            await session.connect()
    assert len(built) == 2  # once, not forever
