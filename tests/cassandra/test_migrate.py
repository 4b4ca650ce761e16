"""Versioned migrations: applied once, listed by status."""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from relay.clock import FakeClock
from relay.common.cassandra.session import CassandraSession
from relay.config import CassandraConfig, ConfigError
from relay.model import Address, Envelope, Outcome
from relay.stores.cassandra.accepted import Accepted, AcceptedIds
from relay.stores.cassandra.layout import DEFAULT_BUCKET_MS, bucket_of, key, seq_at
from relay.stores.cassandra.migrate import (
    format_status,
    load_migrations,
    migrate,
    split_statements,
    status,
)
from relay.stores.cassandra.queue import INSERT_ROW, CassandraQueue
from tests.conformance.queue import BIG, BOB, NOW, env, read_all

pytestmark = pytest.mark.services

MALLORY = Address("t", "mallory", 1)


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


async def test_a_new_keyspace_has_no_layout_1_ids(cassandra_config: CassandraConfig) -> None:
    async with CassandraSession(cassandra_config) as session:
        rows = await session.execute(
            "SELECT version, legacy_ids FROM {ks}.queue_layout WHERE ring = 0", op="test"
        )
    assert rows == [(2, False)]  # appends and acks read queue_ids only


async def test_ids_accepted_under_layout_1_stay_found_after_the_upgrade(
    cassandra_config: CassandraConfig,
) -> None:
    """Dedup and acks across migration 0005: layout-1 ids are read until they expire."""
    config = dataclasses.replace(cassandra_config, keyspace=f"relay_up_{secrets.token_hex(4)}")
    try:
        assert (await migrate(config, until="0004"))[-1] == "0004_accounts"
        stored, acked = env(), env()
        seq = seq_at(NOW) | 5
        bucket = bucket_of(seq, DEFAULT_BUCKET_MS)
        async with CassandraSession(config) as session:
            # What the layout-1 code left: a stored row and its id, an acked id.
            await session.execute_batches(
                AcceptedIds.record([(stored, NOW + 10**9, seq)], NOW), op="test"
            )
            await session.execute_batches(
                AcceptedIds.record([(acked, NOW + 10**9, seq + 8)], NOW), op="test"
            )
            await session.execute_batches(
                AcceptedIds.mark_acked(
                    BOB, [(acked.message_id, Accepted((seq + 8,), False, NOW + 10**9, 1))], NOW
                ),
                op="test",
            )
            s = stored.sender
            await session.execute(
                INSERT_ROW,
                (*key(BOB), bucket, seq, stored.message_id, s.tenant, s.user, s.device,
                 stored.content, NOW, NOW + 10**9, stored.size, 86_400),
                op="test",
            )  # fmt: skip
            await session.execute(
                "INSERT INTO {ks}.queue_index (tenant, user, device, bucket) VALUES (?, ?, ?, ?)",
                (*key(BOB), bucket),
                op="test",
            )
        assert await migrate(config) == ["0005_queue_ids"]
        async with CassandraSession(config) as session:
            layout = await session.execute(
                "SELECT legacy_ids FROM {ks}.queue_layout WHERE ring = 0", op="test"
            )
            assert layout == [(True,)]
            queue = CassandraQueue(session, FakeClock(NOW + 1000))
            new = env()
            res = await queue.append([stored, acked, new], [NOW + 10**9] * 3, BIG)
            assert [r.outcome for r in res] == [
                Outcome.DUPLICATE,
                Outcome.DUPLICATE,
                Outcome.STORED,
            ]
            # Layout-1 ids read as keyed by sender: the stored one is its row's sender's,
            # so another sender's envelope of that id is stored; the one acked under
            # layout 1 has no row (no sender) and stays a duplicate for every sender.
            other = Envelope(stored.message_id, MALLORY, BOB, b"other")
            blind = Envelope(acked.message_id, MALLORY, BOB, b"blind")
            res = await queue.append([other, blind], [NOW + 10**9] * 2, BIG)
            assert [r.outcome for r in res] == [Outcome.STORED, Outcome.DUPLICATE]
            got = [e.key for e in await read_all(queue, BOB)]
            assert got == [stored.key, new.key, other.key]
            assert await queue.ack(BOB, [stored.key, acked.key]) == 1  # not mallory's copy
            assert [e.key for e in await read_all(queue, BOB)] == [new.key, other.key]
            # Acked on layout 2, the layout-1 copy is recorded acked in queue_ids.
            res = await queue.append([stored, new, other], [NOW + 10**9] * 3, BIG)
            assert [r.outcome for r in res] == [Outcome.DUPLICATE] * 3
            assert await queue.ack(BOB, [new.key, other.key]) == 2
            assert await read_all(queue, BOB) == []
            res = await queue.append([stored], [NOW + 10**9], BIG)
            assert res[0].outcome is Outcome.DUPLICATE
    finally:
        async with CassandraSession(config, keyspace="") as admin:
            await admin.execute_ddl(f"DROP KEYSPACE IF EXISTS {config.keyspace}", op="drop")
