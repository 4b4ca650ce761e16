"""bounded_close gives up on a stuck resource and says where it is stuck."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from relay.common.grpcserver import bounded_close


async def test_stuck_exit_is_abandoned_and_located(caplog: pytest.LogCaptureFixture) -> None:
    never = asyncio.Event()
    closed: list[str] = []

    async def stuck_forever_in_close() -> None:
        await never.wait()

    async def quick_close() -> None:
        closed.append("quick")

    stack = contextlib.AsyncExitStack()
    stack.push_async_callback(stuck_forever_in_close)
    stack.push_async_callback(quick_close)
    with caplog.at_level(logging.ERROR, logger="relay.common.grpcserver"):
        await bounded_close(stack, 0.2)
    assert closed == ["quick"]  # the exits before the stuck one ran
    [record] = caplog.records
    assert "did not finish within 0 s" in record.getMessage()
    assert "stuck_forever_in_close" in record.getMessage()


async def test_close_that_finishes_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    stack = contextlib.AsyncExitStack()
    done: list[bool] = []

    async def close() -> None:
        done.append(True)

    stack.push_async_callback(close)
    with caplog.at_level(logging.ERROR):
        await bounded_close(stack, 5.0)
    assert done == [True] and caplog.records == []
