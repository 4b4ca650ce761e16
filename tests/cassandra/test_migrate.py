"""Versioned migrations: applied once, listed by status."""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from relay.common.cassandra.session import CassandraSession
from relay.config import CassandraConfig, ConfigError
from relay.stores.cassandra.migrate import (
    format_status,
    load_migrations,
    migrate,
    split_statements,
    status,
)

pytestmark = pytest.mark.services


def test_migrations_are_numbered_and_split() -> None:
    migrations = load_migrations()
    assert [m.label for m in migrations][:2] == ["0001_queue", "0002_keys"]
    assert all(m.statements for m in migrations)
    assert all(";" not in s for m in migrations for s in m.statements)
    text = (
        "-- a comment; not a statement\nCREATE TABLE a (\n  x int PRIMARY KEY\n);\nDROP TABLE b;\n"
    )
    assert split_statements(text) == ["CREATE TABLE a (\n  x int PRIMARY KEY\n)", "DROP TABLE b"]
    with pytest.raises(ValueError, match="no ';'"):
        split_statements("CREATE TABLE a (x int PRIMARY KEY)")


async def test_the_session_keyspace_is_fully_migrated(cassandra_config: CassandraConfig) -> None:
    states = await status(cassandra_config)
    assert [s.migration.label for s in states] == [m.label for m in load_migrations()]
    assert all(s.applied for s in states)
    assert "pending" not in format_status(states)
    assert await migrate(cassandra_config) == []  # applying again is a no-op


async def test_a_new_keyspace_is_created_then_migrated_once(
    cassandra_config: CassandraConfig,
) -> None:
    config = dataclasses.replace(cassandra_config, keyspace=f"relay_mig_{secrets.token_hex(4)}")
    try:
        before = await status(config)
        assert before and not any(s.applied for s in before)
        assert format_status(before).startswith("pending  0001_queue")
        labels = [m.label for m in load_migrations()]
        assert await migrate(config) == labels
        assert await migrate(config) == []
        after = await status(config)
        assert all(s.applied for s in after)
        assert format_status(after).startswith("applied  0001_queue  (")
    finally:
        async with CassandraSession(config, keyspace="") as admin:
            await admin.execute_ddl(f"DROP KEYSPACE IF EXISTS {config.keyspace}", op="drop")


async def test_a_bad_keyspace_name_is_a_config_error(cassandra_config: CassandraConfig) -> None:
    config = dataclasses.replace(cassandra_config, keyspace="x; DROP KEYSPACE y")
    with pytest.raises(ConfigError, match=r"cassandra\.keyspace"):
        await migrate(config)
