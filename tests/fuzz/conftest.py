"""Fixtures of the fuzz tests: one pair of servers per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.fuzz.target import Target, running_target


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    """A key directory and relay node with a registered roster, shared by a module."""
    async with running_target(tmp_path_factory.mktemp("fuzz") / "data") as running:
        yield running
