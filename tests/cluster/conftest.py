"""A cluster of relay nodes on shared storage and Redis presence, in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyserver.app import KeyserverApp
from relay.common.cassandra.session import CassandraSession
from relay.common.devcerts import DevCerts, make_dev_certs
from relay.config import CassandraConfig, Config, TlsConfig
from relay.errors import Unavailable
from relay.server.app import RelayApp
from relay.stores.cassandra.migrate import migrate
from tests.conftest import test_config
from tests.process import Relayd
from tests.services import CASSANDRA_PORT, REDIS_PORT, REDIS_URL, require

pytestmark = pytest.mark.services


@dataclass
class Cluster:
    """A key directory and several relay nodes sharing storage and presence."""

    config: Config
    keys: KeyserverApp
    nodes: list[RelayApp]
    stack: AsyncExitStack
    stopped: set[int] = field(default_factory=set)
    #: Dev certificates when every hop is TLS and node links are mutual TLS.
    certs: DevCerts | None = None

    @property
    def keys_address(self) -> str:
        return self.keys.address

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    @property
    def tls_ca(self) -> str:
        """The CA file that verifies every server of the cluster ("" without TLS)."""
        return str(self.certs.ca) if self.certs is not None else ""

    def node_config(self, i: int, *, certificate_of: str = "") -> Config:
        """Node ``relay-<i>``; with TLS it presents the certificate of ``certificate_of``
        (default: its own)."""
        config = dataclasses.replace(
            self.config, node=dataclasses.replace(self.config.node, id=f"relay-{i}")
        )
        if self.certs is None:
            return config
        files = self.certs.nodes[certificate_of or f"relay-{i}"]
        tls = TlsConfig(
            cert_file=str(files.cert),
            key_file=str(files.key),
            client_ca_file=str(self.certs.ca),
            ca_file=str(self.certs.ca),
        )
        return dataclasses.replace(config, tls=tls)


_KEYSPACES: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _drop_test_keyspaces() -> Iterator[None]:
    """Drop this session's test keyspaces at the end (best effort, bounded in time).

    Dropping after each test would put a slow schema change (a flush of every table) in
    every teardown; a few small keyspaces left until the end cost nothing.
    """
    yield
    if not _KEYSPACES:
        return

    async def drop_all() -> None:
        config = CassandraConfig(port=CASSANDRA_PORT)
        async with asyncio.timeout(90), CassandraSession(config, keyspace="") as session:
            for name in _KEYSPACES:
                await session.execute_ddl(f"DROP KEYSPACE IF EXISTS {name}", op="drop")

    try:
        asyncio.run(drop_all())
    except (Unavailable, TimeoutError) as exc:
        warnings.warn(f"test keyspaces left behind: {exc!r}", stacklevel=1)


@pytest.fixture
async def cassandra_keyspace() -> str:
    """A fresh, migrated keyspace for one test (dropped at the end of the session)."""
    require("Cassandra", CASSANDRA_PORT)
    config = CassandraConfig(port=CASSANDRA_PORT, keyspace=f"relay_c_{uuid.uuid4().hex[:10]}")
    await migrate(config)
    _KEYSPACES.append(config.keyspace)
    return config.keyspace


@pytest.fixture
async def cluster_overrides(cassandra_keyspace: str, tmp_path: Path) -> dict[str, Any]:
    """Config overrides of a cluster: Cassandra storage, Redis presence, isolated names.

    Every process shares one relay nodes' key file (their credential to the key directory).
    """
    require("Redis", REDIS_PORT)
    return {
        "keyserver.relay_key_file": str(tmp_path / "relay-node.key"),
        "presence.backend": "redis",
        "presence.redis_url": REDIS_URL,
        "presence.key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
        "presence.node_ttl_seconds": 3.0,
        "storage.backend": "cassandra",
        "cassandra.port": CASSANDRA_PORT,
        "cassandra.keyspace": cassandra_keyspace,
    }


@pytest.fixture
async def cluster(cluster_overrides: dict[str, Any], tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three relay nodes on 127.0.0.1 port 0 with Redis presence and Cassandra."""
    cfg = test_config(tmp_path / "data", **cluster_overrides)
    async with AsyncExitStack() as stack:
        keys = await stack.enter_async_context(KeyserverApp(cfg))
        cfg = dataclasses.replace(
            cfg, keyserver=dataclasses.replace(cfg.keyserver, target=keys.address)
        )
        cluster = Cluster(cfg, keys, [], stack)
        for i in range(3):
            cluster.nodes.append(await stack.enter_async_context(RelayApp(cluster.node_config(i))))
        yield cluster


@pytest.fixture
async def tls_cluster(cluster_overrides: dict[str, Any], tmp_path: Path) -> AsyncIterator[Cluster]:
    """:func:`cluster` with TLS on every hop and mutual TLS on node links.

    Dev certificates (``relay.common.devcerts``) for nodes relay-0 .. relay-3, each
    naming its node id; the key directory serves ``keys.pem``. relay-3 is not started:
    a test may start a node presenting another node's certificate.
    """
    certs = make_dev_certs(tmp_path / "certs", node_ids=[f"relay-{i}" for i in range(4)])
    assert certs.keys is not None
    cfg = test_config(tmp_path / "data", **cluster_overrides)
    keys_tls = TlsConfig(
        cert_file=str(certs.keys.cert), key_file=str(certs.keys.key), ca_file=str(certs.ca)
    )
    async with AsyncExitStack() as stack:
        keys = await stack.enter_async_context(KeyserverApp(dataclasses.replace(cfg, tls=keys_tls)))
        cfg = dataclasses.replace(
            cfg, keyserver=dataclasses.replace(cfg.keyserver, target=keys.address)
        )
        cluster = Cluster(cfg, keys, [], stack, certs=certs)
        for i in range(3):
            cluster.nodes.append(await stack.enter_async_context(RelayApp(cluster.node_config(i))))
        yield cluster


def write_toml(path: Path, settings: dict[str, Any]) -> Path:
    """Write dotted-key ``settings`` as a TOML config file (tables per section)."""
    sections: dict[str, list[str]] = {}
    for dotted, value in settings.items():
        section, _, key = dotted.partition(".")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        sections.setdefault(section, []).append(f"{key} = {text}")
    path.write_text(
        "".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in sections.items())
    )
    return path


@dataclass
class ProcCluster:
    """Relay nodes as real processes (``relayd relay``), a key directory in-process."""

    keys_address: str
    nodes: list[Relayd]

    @property
    def addresses(self) -> list[str]:
        return [n.relay_address for n in self.nodes]


@pytest.fixture
async def proc_cluster(
    cluster_overrides: dict[str, Any], tmp_path: Path
) -> AsyncIterator[ProcCluster]:
    """Three ``relayd relay`` processes on Cassandra and Redis."""
    cfg = test_config(tmp_path / "keys", **cluster_overrides)
    async with KeyserverApp(cfg) as keys:
        settings = {
            **cluster_overrides,
            "keyserver.target": keys.address,
            "node.grace_seconds": 1.0,
        }
        config = write_toml(tmp_path / "relay.toml", settings)
        nodes = [
            Relayd(
                tmp_path / f"node{i}" / "data", command="relay", config=config, node_id=f"relay-{i}"
            )
            for i in range(3)
        ]
        try:
            for node in nodes:
                await node.start()
            yield ProcCluster(keys.address, nodes)
        finally:
            for node in nodes:
                node.stop()
