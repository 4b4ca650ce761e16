"""Fixtures of the account tests: a real key directory (and relay) on each backend.

``backend`` runs a test on the embedded store and on Cassandra (one migrated keyspace
per test session; every test uses users of its own, so nothing needs truncating).
Token tenants: ``acme`` has registration policy ``token``; the signing key its backend
would hold is ``TENANT_KEY``.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.clock import SystemClock
from relay.config import CassandraConfig
from relay.errors import Unavailable
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient
from relay.stores.cassandra.migrate import migrate
from tests.conftest import Servers, StartServers
from tests.services import CASSANDRA_PORT, require

TOKEN_TENANT = "acme"
TENANT_KEY = Ed25519PrivateKey.generate()
BACKENDS = ["embedded", pytest.param("cassandra", marks=pytest.mark.services)]


@pytest.fixture(scope="session")
def account_keyspace() -> Iterator[str]:
    """A migrated Cassandra keyspace for this session's account tests."""
    require("Cassandra", CASSANDRA_PORT)
    config = CassandraConfig(
        port=CASSANDRA_PORT,
        keyspace=f"relay_acct_{secrets.token_hex(4)}",
        request_timeout_seconds=30.0,
    )
    try:  # in a thread of its own: the fixture may be asked for inside a running loop
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, migrate(config)).result()
    except Unavailable as exc:
        pytest.fail(f"could not migrate a Cassandra keyspace: {exc}")
    yield config.keyspace


def overrides(tmp_path: Path, keyspace: str | None = None) -> dict[str, Any]:
    """Config overrides with the token tenant ``acme``; on Cassandra with ``keyspace``."""
    key_file = tmp_path / "acme-token.pub"
    key_file.write_text(TENANT_KEY.public_key().public_bytes_raw().hex())
    settings: dict[str, Any] = {
        "keyserver.tenants": [
            {
                "name": TOKEN_TENANT,
                "registration": "token",
                "token_public_key_file": str(key_file),
            }
        ],
    }
    if keyspace is not None:
        settings |= {
            "storage.backend": "cassandra",
            "cassandra.port": CASSANDRA_PORT,
            "cassandra.keyspace": keyspace,
        }
    return settings


@pytest.fixture(params=BACKENDS)
async def srv(
    request: pytest.FixtureRequest, start_servers: StartServers, tmp_path: Path
) -> Servers:
    """A relay node and key directory on the backend of the parameter."""
    keyspace = request.getfixturevalue("account_keyspace") if request.param == "cassandra" else None
    return await start_servers(**overrides(tmp_path, keyspace))


@pytest.fixture
def user() -> str:
    """A user name of this test alone (the Cassandra keyspace is shared)."""
    return f"u{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def directory(srv: Servers) -> AsyncIterator[KeyDirectoryClient]:
    """A key directory client (sign it in with ``sign_as`` before reads)."""
    async with grpc.aio.insecure_channel(srv.keys_address) as channel:
        yield KeyDirectoryClient(channel, clock=SystemClock())


def signed_in(directory: KeyDirectoryClient, state: DeviceState) -> KeyDirectoryClient:
    """``directory`` signing reads as the device in ``state``."""
    identity, address = state.identity(), state.address()
    assert identity is not None and address is not None
    directory.sign_as(identity, address)
    return directory


def own(state: DeviceState) -> Address:
    """The address of the registered device in ``state``."""
    address = state.address()
    assert address is not None
    return address
