"""The embedded SQLite key store against the key store conformance suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from keyserver.sqlite_store import KEYS_DB, SCHEMA, sqlite_key_stores
from relay.common.sqlite_worker import SqliteWorker
from tests.keyserver.conformance import (
    AccountDirectoryConformance,
    DeviceDirectoryConformance,
    LinkRequestsConformance,
    OnceOnlyConformance,
    OpenStores,
    PqPrekeyStoreConformance,
    PrekeyHandoutConformance,
    PrekeyStoreConformance,
    Stores,
)


class TestSqliteKeyStores(
    DeviceDirectoryConformance,
    AccountDirectoryConformance,
    LinkRequestsConformance,
    OnceOnlyConformance,
    PrekeyStoreConformance,
    PqPrekeyStoreConformance,
    PrekeyHandoutConformance,
):
    @pytest.fixture
    def open_stores(self, tmp_path: Path) -> OpenStores:
        @asynccontextmanager
        async def open_stores() -> AsyncIterator[Stores]:
            async with SqliteWorker(tmp_path / KEYS_DB, SCHEMA) as worker:
                yield sqlite_key_stores(worker)

        return open_stores
