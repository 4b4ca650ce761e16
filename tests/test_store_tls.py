"""TLS settings of the data stores without the services: config keys, files, host names.

A small TLS server on loopback whose certificate names another host stands in for
Cassandra and Redis where a host-name mismatch is the point (the services' own
certificates name 127.0.0.1 and localhost).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.common.cassandra.session import CassandraSession
from relay.common.devcerts import DevCerts, make_dev_certs
from relay.common.store_tls import ClientTls, cassandra_tls, redis_client_kwargs, redis_tls
from relay.config import CassandraConfig, ConfigError, PresenceConfig, load
from relay.errors import Unavailable
from relay.model import Address
from relay.stores.redis_presence import RedisPresence

BOB = Address("t", "bob", 1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A CA and a server certificate that names ``elsewhere.test`` only."""
    return make_dev_certs(
        tmp_path_factory.mktemp("elsewhere"),
        node_ids=(),
        hosts=("elsewhere.test",),
        services=("fake",),
        loopback=False,
    )


class TlsServer:
    """Accepts TLS on 127.0.0.1 and hangs up after the handshake."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)  # accept() wakes up to notice close()
        self._stop = threading.Event()
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2.0)
            with contextlib.suppress(OSError):
                self._context.wrap_socket(conn, server_side=True).close()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def server(certs: DevCerts) -> Iterator[TlsServer]:
    fake = certs.services["fake"]
    tls = TlsServer(fake.cert, fake.key)
    yield tls
    tls.close()


# ---------------------------------------------------------------- config


def test_cassandra_tls_is_on_with_a_ca_file_only() -> None:
    assert cassandra_tls(CassandraConfig()) is None
    tls = cassandra_tls(CassandraConfig(ssl_ca_file="/x/ca.pem"))
    assert tls is not None and tls.check_hostname and tls.ca_key == "cassandra.ssl_ca_file"


def test_cassandra_client_certificate_needs_key_and_ca() -> None:
    with pytest.raises(ConfigError, match=r"cassandra\.ssl_cert_file, cassandra\.ssl_key_file"):
        CassandraConfig(ssl_ca_file="/ca.pem", ssl_cert_file="/c.pem")
    with pytest.raises(ConfigError, match=r"^cassandra\.ssl_ca_file"):
        CassandraConfig(ssl_cert_file="/c.pem", ssl_key_file="/c.key")


def test_redis_tls_files_need_a_rediss_url() -> None:
    assert redis_tls(PresenceConfig()) is None
    assert redis_tls(PresenceConfig(redis_url="rediss://h:1/0")) is not None
    with pytest.raises(ConfigError, match=r"^presence\.redis_ca_file: .*rediss://"):
        PresenceConfig(redis_ca_file="/ca.pem")
    with pytest.raises(ConfigError, match=r"presence\.redis_cert_file, presence\.redis_key_file"):
        PresenceConfig(redis_url="rediss://h:1/0", redis_cert_file="/c.pem")


def test_toml_keys(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[cassandra]\nssl_ca_file = "/ca.pem"\nssl_check_hostname = false\n'
        '[presence]\nredis_url = "rediss://r:6380/0"\nredis_ca_file = "/ca.pem"\n'
    )
    config = load(path)
    assert config.cassandra.ssl_ca_file == "/ca.pem" and not config.cassandra.ssl_check_hostname
    assert config.presence.redis_ca_file == "/ca.pem"
    path.write_text('[cassandra]\nssl_check_hostname = "no"\n')
    with pytest.raises(ConfigError, match=r"cassandra\.ssl_check_hostname: expected bool"):
        load(path)


def test_unreadable_files_name_their_key(tmp_path: Path, certs: DevCerts) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"^cassandra\.ssl_ca_file: .*nope\.pem"):
        cassandra_tls(CassandraConfig(ssl_ca_file=missing)).context()  # type: ignore[union-attr]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^cassandra\.ssl_ca_file: .* holds no PEM CA"):
        cassandra_tls(CassandraConfig(ssl_ca_file=str(garbage))).context()  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"^presence\.redis_key_file: .*nope\.pem"):
        redis_client_kwargs(
            PresenceConfig(
                redis_url="rediss://127.0.0.1:1/0",
                redis_cert_file=str(certs.client.cert),  # type: ignore[union-attr]
                redis_key_file=missing,
            )
        )


async def test_session_raises_the_config_error(tmp_path: Path) -> None:
    config = CassandraConfig(ssl_ca_file=str(tmp_path / "nope.pem"))
    session = CassandraSession(config, keyspace="")
    with pytest.raises(ConfigError, match=r"^cassandra\.ssl_ca_file"):
        await session.connect()
    with pytest.raises(ConfigError, match=r"^cassandra\.ssl_ca_file"):  # again, not Unavailable
        await session.connect()
    await session.close()


def test_presence_raises_the_config_error(tmp_path: Path) -> None:
    config = PresenceConfig(redis_url="rediss://127.0.0.1:1/0", redis_ca_file=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"^presence\.redis_ca_file"):
        RedisPresence(config)


def test_redis_kwargs() -> None:
    assert redis_client_kwargs(PresenceConfig()) == {}
    kwargs = redis_client_kwargs(PresenceConfig(redis_url="rediss://127.0.0.1:1/0"))
    assert kwargs == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}


# ---------------------------------------------------------------- messages


def test_explain_without_a_tls_failure_is_none() -> None:
    tls = ClientTls("", "", "", True, "k.ca", "k.cert", "k.key")
    assert tls.explain(ConnectionRefusedError(111, "Connection refused"), "h:1") is None
    required = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert (_ssl.c:1)")
    outer = RuntimeError("wrapped")
    outer.__context__ = required
    assert tls.explain(outer, "h:1") == (
        "TLS: h:1 requires a client certificate: set k.cert and k.key"
    )


# ---------------------------------------------------------------- host names


async def test_cassandra_host_name_mismatch(server: TlsServer, certs: DevCerts) -> None:
    config = CassandraConfig(
        port=server.port, ssl_ca_file=str(certs.ca), request_timeout_seconds=1.0
    )
    async with asyncio.timeout(30), CassandraSession(config, keyspace="") as session:
        with pytest.raises(Unavailable) as info:
            await session.connect()
    message = str(info.value)
    assert (
        f"the server certificate of 127.0.0.1:{server.port} does not match the host name" in message
    )
    assert "cassandra.ssl_check_hostname = false" in message


async def test_cassandra_without_the_host_name_check(server: TlsServer, certs: DevCerts) -> None:
    config = CassandraConfig(
        port=server.port,
        ssl_ca_file=str(certs.ca),
        ssl_check_hostname=False,
        request_timeout_seconds=1.0,
    )
    async with asyncio.timeout(30), CassandraSession(config, keyspace="") as session:
        with pytest.raises(Unavailable) as info:  # the handshake passes; the fake is no CQL
            await session.connect()
    assert "TLS:" not in str(info.value)


async def test_redis_host_name_mismatch(server: TlsServer, certs: DevCerts) -> None:
    config = PresenceConfig(
        backend="redis",
        redis_url=f"rediss://127.0.0.1:{server.port}/0",
        redis_ca_file=str(certs.ca),
    )
    async with asyncio.timeout(30), RedisPresence(config) as presence:
        with pytest.raises(Unavailable) as info:
            await presence.claim(BOB, "n1", 1)
    message = str(info.value)
    assert (
        f"the server certificate of 127.0.0.1:{server.port} does not match the host name" in message
    )
