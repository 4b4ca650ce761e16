"""Plaintext never reaches the server: three relay nodes on real Cassandra and Redis.

Known random plaintexts are sent while the recipient is offline, so every envelope is
stored in Cassandra. Then every row of every table of the test keyspace, the server
logs (DEBUG, captured from the in-process nodes and key directory) and Cassandra's own
commit log and data files are searched for them: zero hits. As a control, the queue
rows hold the ciphertexts the sender sealed. Finally the recipient, on another node,
reads every message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from relay.common.cassandra.session import CassandraSession
from relay.config import CassandraConfig
from relay.sdk.secure import SecureClient
from tests.cluster.conftest import Cluster
from tests.e2ee.helpers import (
    MARKER,
    canaries,
    found_ciphertext,
    hits,
    provision,
    record_seals,
    take,
)
from tests.services import CASSANDRA_PORT

COUNT = 40


def cassandra_dir() -> Path:
    cache = Path(os.environ.get("RELAY_CACHE_DIR", "~/.cache/e2ee-relay")).expanduser()
    return Path(os.environ.get("RELAY_RUN_DIR", cache / "run")) / "cassandra"


def marker_in_files(root: Path) -> list[str]:
    """Files under ``root`` (commit log, sstables) that hold the plaintext marker."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                if MARKER in f.read():
                    found.append(str(path))
    return found


async def keyspace_dump(keyspace: str) -> bytes:
    """Every cell of every table of ``keyspace``, as bytes."""
    out: list[bytes] = []
    config = CassandraConfig(port=CASSANDRA_PORT, keyspace=keyspace)
    async with CassandraSession(config) as session:
        tables = await session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            [keyspace],
            op="list tables",
        )
        assert len(tables) >= 3
        for (table,) in tables:
            for row in await session.execute(f"SELECT * FROM {keyspace}.{table}", op="dump"):
                for cell in row:
                    out.append(cell if isinstance(cell, bytes) else repr(cell).encode())
    return b"\x00".join(out)


async def test_plaintexts_never_reach_cassandra_or_the_logs(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay")
    caplog.set_level(logging.DEBUG, logger="keyserver")
    alice = await provision(cluster.keys_address, tmp_path / "alice", "alice")
    bob = await provision(cluster.keys_address, tmp_path / "bob", "bob")
    plaintexts = canaries(COUNT)
    async with SecureClient(alice, cluster.addresses[0], cluster.keys_address) as sender:
        sealed = record_seals(sender)
        for plaintext in plaintexts:
            await sender.send("bob", plaintext)
    assert len(sealed) == COUNT

    keyspace = cluster.config.cassandra.keyspace
    rows = await keyspace_dump(keyspace)
    assert hits(rows, plaintexts) == []
    assert all(found_ciphertext(c, rows) for c in sealed)  # control: ciphertexts are there
    assert hits(caplog.text.encode(), plaintexts) == []
    if cassandra_dir().is_dir():  # the node `make services` runs
        assert marker_in_files(cassandra_dir()) == []

    async with SecureClient(bob, cluster.addresses[1], cluster.keys_address) as reader:
        received = await take(reader, COUNT)
    assert [m.body for m in received] == plaintexts
    assert hits(caplog.text.encode(), plaintexts) == []
