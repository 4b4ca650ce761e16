"""Cassandra over TLS: the TLS-only native port of `make services` (client certificate required).

The services script makes the dev certificates (``relay.common.devcerts``) and serves
them on ``CASSANDRA_TLS_PORT`` (9142). Each failure is bounded (``request_timeout``)
and must say which certificate did not verify, not just "unavailable".
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relay.common.cassandra.session import CassandraSession
from relay.common.devcerts import make_dev_certs
from relay.config import CassandraConfig
from relay.errors import Unavailable
from tests.services import CASSANDRA_PORT, CASSANDRA_TLS_PORT, TLS_DIR, require, require_tls

pytestmark = pytest.mark.services
#: No TLS failure may take longer than this (connect + handshake are bounded by 5 s).
BOUND_SECONDS = 30.0


@pytest.fixture(autouse=True)
def _cassandra_tls() -> None:
    require_tls("Cassandra over TLS", CASSANDRA_TLS_PORT)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second dev CA (same names, other keys) and its client certificate."""
    directory = tmp_path_factory.mktemp("other-ca")
    make_dev_certs(directory, node_ids=())
    return directory


def config(**overrides: Any) -> CassandraConfig:
    settings: dict[str, Any] = {
        "contact_points": ("127.0.0.1",),
        "port": CASSANDRA_TLS_PORT,
        "request_timeout_seconds": 5.0,
        "ssl_ca_file": str(TLS_DIR / "ca.pem"),
        "ssl_cert_file": str(TLS_DIR / "client.pem"),
        "ssl_key_file": str(TLS_DIR / "client.key"),
    }
    settings.update(overrides)
    return CassandraConfig(**settings)


async def release_version(cfg: CassandraConfig) -> str:
    async with asyncio.timeout(BOUND_SECONDS), CassandraSession(cfg, keyspace="") as session:
        await session.connect()
        rows = await session.execute("SELECT release_version FROM system.local", op="probe")
        return str(rows[0][0])


async def connect_error(cfg: CassandraConfig) -> str:
    async with asyncio.timeout(BOUND_SECONDS), CassandraSession(cfg, keyspace="") as session:
        with pytest.raises(Unavailable) as info:
            await session.connect()
        # The next attempt within the reconnect interval says the same.
        with pytest.raises(Unavailable) as again:
            await session.execute("SELECT release_version FROM system.local", op="probe")
        assert "TLS:" in str(again.value)
        return str(info.value)


async def test_query_over_tls_with_the_dev_ca_and_client_certificate() -> None:
    assert (await release_version(config())).startswith("5.")


async def test_query_over_tls_by_host_name() -> None:
    # The service certificate names localhost too; the driver checks the name it dialled.
    cfg = config(contact_points=("localhost",))
    assert (await release_version(cfg)).startswith("5.")


async def test_wrong_ca_says_which_certificate_did_not_verify(other_ca: Path) -> None:
    wrong = str(other_ca / "ca.pem")
    message = await connect_error(config(ssl_ca_file=wrong))
    assert f"cannot connect to 127.0.0.1:{CASSANDRA_TLS_PORT}" in message
    assert f"the server certificate of 127.0.0.1:{CASSANDRA_TLS_PORT} did not verify" in message
    assert wrong in message and "cassandra.ssl_ca_file" in message


async def test_missing_client_certificate_is_named() -> None:
    message = await connect_error(config(ssl_cert_file="", ssl_key_file=""))
    # "requires a client certificate", or (when the server hangs up before its alert
    # arrives) "does it require a client certificate?"
    assert "require" in message and "a client certificate" in message
    assert "cassandra.ssl_cert_file" in message


async def test_untrusted_client_certificate_is_presented_and_refused(other_ca: Path) -> None:
    # The client certificate really is sent: one the server does not trust is refused.
    cert = str(other_ca / "client.pem")
    message = await connect_error(
        config(ssl_cert_file=cert, ssl_key_file=str(other_ca / "client.key"))
    )
    # "refused the handshake (...)", or a reset when the server closed before its alert
    assert f"does it trust the client certificate {cert}" in message


async def test_tls_against_the_plaintext_port_says_so() -> None:
    require("Cassandra", CASSANDRA_PORT)
    message = await connect_error(config(port=CASSANDRA_PORT))
    assert "did not answer in TLS" in message
