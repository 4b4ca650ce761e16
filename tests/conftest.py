"""Shared fixtures: real servers in-process on port 0."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyserver.app import KeyserverApp
from relay.config import Config, load
from relay.server.app import RelayApp


@dataclass
class Servers:
    """A running key directory and relay node."""

    config: Config
    keys: KeyserverApp
    relay: RelayApp

    @property
    def relay_address(self) -> str:
        return self.relay.address

    @property
    def keys_address(self) -> str:
        return self.keys.address


StartServers = Callable[..., Awaitable[Servers]]


def test_config(data_dir: Path, **overrides: Any) -> Config:
    """A configuration on loopback port 0 with its data in ``data_dir``."""
    base = {
        "storage.data_dir": str(data_dir),
        "node.listen": "127.0.0.1:0",
        "node.grace_seconds": 0.5,
        "keyserver.listen": "127.0.0.1:0",
    }
    base.update(overrides)
    return load(None, base)


@pytest.fixture
async def start_servers(tmp_path: Path) -> AsyncIterator[StartServers]:
    """Factory: ``await start_servers(**{"limits.max_queue_depth": 3})``."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Servers:
            cfg = test_config(tmp_path / "data", **overrides)
            keys = await stack.enter_async_context(KeyserverApp(cfg))
            cfg = dataclasses.replace(
                cfg, keyserver=dataclasses.replace(cfg.keyserver, target=keys.address)
            )
            relay = await stack.enter_async_context(RelayApp(cfg))
            return Servers(cfg, keys, relay)

        yield start


@pytest.fixture
async def servers(start_servers: StartServers) -> Servers:
    """A relay node and key directory with default limits."""
    return await start_servers()


@pytest.fixture
async def channel(servers: Servers) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the relay node of ``servers``."""
    async with grpc.aio.insecure_channel(servers.relay_address) as ch:
        yield ch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests that stop a shared service (marked ``disruptive``) after all others."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
