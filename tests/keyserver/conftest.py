"""Fixtures of the key directory tests: a core on the embedded store, a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from keyserver.app import KeyserverApp
from keyserver.directory import DirectoryLimits, KeyDirectory
from keyserver.sqlite_store import KEYS_DB, SCHEMA, sqlite_key_stores
from relay.clock import FakeClock
from relay.common.sqlite_worker import SqliteWorker
from relaypb.keys.v1 import keys_pb2_grpc
from tests.keyserver.wire import config

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub

MakeCore = Callable[..., KeyDirectory]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_core(tmp_path: Path, clock: FakeClock) -> AsyncIterator[MakeCore]:
    """Factory of cores sharing one store; keyword arguments are DirectoryLimits."""
    async with SqliteWorker(tmp_path / KEYS_DB, SCHEMA) as worker:

        def make(**limits: Any) -> KeyDirectory:
            return KeyDirectory(sqlite_key_stores(worker), clock, DirectoryLimits(**limits))

        yield make


@pytest.fixture
def core(make_core: MakeCore) -> KeyDirectory:
    return make_core()


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[KeyserverApp]:
    async with KeyserverApp(config(tmp_path), clock) as app:
        yield app


@pytest.fixture
async def channel(app: KeyserverApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> KeyDirectoryAsyncStub:
    return keys_pb2_grpc.KeyDirectoryStub(channel)
