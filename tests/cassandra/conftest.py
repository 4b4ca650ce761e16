"""Fixtures for the tests against a real Cassandra (``make services``).

One keyspace per test session (random name), created by ``migrate()`` and dropped at
the end; every test that needs an empty store truncates its tables first. If Cassandra
does not answer, the tests are skipped, or fail when ``RELAY_REQUIRE_SERVICES=1``
(``make test`` sets it).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from relay.common.cassandra.session import CassandraSession
from relay.config import CassandraConfig
from relay.errors import Unavailable
from relay.stores.cassandra.migrate import migrate

HOST = "127.0.0.1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "services: needs Redis/Cassandra (`make services`)")


def cassandra_port() -> int:
    return int(os.environ.get("RELAY_CASSANDRA_PORT", "9042"))


def unreachable(reason: str) -> None:
    message = (
        f"Cassandra is not reachable on {HOST}:{cassandra_port()}: run `make services` ({reason})"
    )
    if os.environ.get("RELAY_REQUIRE_SERVICES") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


async def _drop(config: CassandraConfig) -> None:
    async with CassandraSession(config, keyspace="") as session:
        await session.execute_ddl(f"DROP KEYSPACE IF EXISTS {config.keyspace}", op="drop")


@pytest.fixture(scope="session")
def cassandra_config() -> Iterator[CassandraConfig]:
    """A fresh, migrated keyspace for this test session; dropped at the end."""
    config = CassandraConfig(
        contact_points=(HOST,),
        port=cassandra_port(),
        keyspace=f"relay_test_{secrets.token_hex(4)}",
        request_timeout_seconds=30.0,
    )
    try:
        asyncio.run(migrate(config))
    except Unavailable as exc:
        unreachable(str(exc))
    yield config
    asyncio.run(_drop(config))


@pytest.fixture
async def cassandra(cassandra_config: CassandraConfig) -> AsyncIterator[CassandraSession]:
    """An open session on the test keyspace."""
    async with CassandraSession(cassandra_config) as session:
        await session.connect()
        yield session


async def truncate_all(session: CassandraSession) -> None:
    """Empty every table of the keyspace but ``schema_migrations`` and ``queue_layout``.

    (Both describe the schema, written by ``migrate``, not data.)
    """
    rows = await session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
        (session.keyspace,),
        op="list tables",
    )
    tables = [name for (name,) in rows if name not in ("schema_migrations", "queue_layout")]
    await asyncio.gather(*(session.execute_ddl(f"TRUNCATE {t}", op="truncate") for t in tables))


@pytest.fixture
async def fresh(cassandra: CassandraSession) -> CassandraSession:
    """``cassandra`` with every table emptied first."""
    await truncate_all(cassandra)
    return cassandra
