"""A cluster of relay nodes on shared storage and Redis presence, in this process."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyserver.app import KeyserverApp
from relay.config import Config
from relay.server.app import RelayApp
from tests.conftest import test_config
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

    @property
    def keys_address(self) -> str:
        return self.keys.address

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def node_config(self, i: int) -> Config:
        return dataclasses.replace(
            self.config, node=dataclasses.replace(self.config.node, id=f"relay-{i}")
        )


def cluster_overrides(tmp_path: Path, backend: str) -> dict[str, Any]:
    require("Redis", REDIS_PORT)
    overrides: dict[str, Any] = {
        "presence.backend": "redis",
        "presence.redis_url": REDIS_URL,
        "presence.key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
        "presence.node_ttl_seconds": 3.0,
    }
    if backend == "cassandra":
        require("Cassandra", CASSANDRA_PORT)
        overrides["storage.backend"] = "cassandra"
        overrides["cassandra.port"] = CASSANDRA_PORT
    return overrides


@pytest.fixture(params=["shared-sqlite"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three relay nodes on 127.0.0.1 port 0 with Redis presence and one shared store."""
    cfg = test_config(tmp_path / "data", **cluster_overrides(tmp_path, request.param))
    async with AsyncExitStack() as stack:
        keys_cfg = dataclasses.replace(
            cfg, storage=dataclasses.replace(cfg.storage, backend="embedded")
        )
        keys = await stack.enter_async_context(KeyserverApp(keys_cfg))
        cfg = dataclasses.replace(
            cfg, keyserver=dataclasses.replace(cfg.keyserver, target=keys.address)
        )
        cluster = Cluster(cfg, keys, [], stack)
        for i in range(3):
            cluster.nodes.append(await stack.enter_async_context(RelayApp(cluster.node_config(i))))
        yield cluster
