"""SIGTERM on a real ``relayd run`` process: NOT_SERVING, NODE_DRAINING, exit 0 in time."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay.config import DEFAULT_GRACE_SECONDS
from relaypb.relay.v1 import relay_pb2
from tests.process import Relayd
from tests.support import connect, envelope, register
from tests.test_drain import assert_draining, ended_with

pytestmark = pytest.mark.integration

DRAIN_DELAY = 1.5
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator[Relayd]:
    proc = Relayd(tmp_path / "data", drain_delay=DRAIN_DELAY)
    yield proc
    proc.stop()


async def not_serving(channel: grpc.aio.Channel, service: str = "") -> float:
    """Watch the health of ``service`` until it says NOT_SERVING; return when (monotonic)."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=service)
    )
    try:
        async for reply in watch:
            if reply.status == NOT_SERVING:
                return time.monotonic()
    finally:
        watch.cancel()
    raise AssertionError("the health watch ended before NOT_SERVING")


async def test_sigterm_drains_relayd_run_and_exits_0_within_the_grace(relayd: Relayd) -> None:
    await relayd.start()
    alice = await register(relayd.keys_address, "alice")
    bob = await register(relayd.keys_address, "bob")
    assert relayd.proc is not None
    async with (
        grpc.aio.insecure_channel(relayd.relay_address) as channel,
        grpc.aio.insecure_channel(relayd.keys_address) as keys_channel,
    ):
        receiving = await connect(channel, bob)
        await receiving.until_queue_empty()
        relay_watch = asyncio.create_task(not_serving(channel))
        keys_watch = asyncio.create_task(not_serving(keys_channel, "relaypb.keys.v1.KeyDirectory"))
        signalled = time.monotonic()
        relayd.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            seen = await relay_watch
            await keys_watch
        assert seen - signalled < DRAIN_DELAY, "NOT_SERVING came only after the delay"
        # During the delay the node still serves: a new session, a send, a delivery.
        sending = await connect(channel, alice, receive=False)
        (ok,) = await sending.send(envelope(bob.address, b"during the drain delay"))
        assert ok.outcome in (relay_pb2.OUTCOME_STORED, relay_pb2.OUTCOME_DELIVERED)
        (got,) = await receiving.receive(1)
        assert got.content == b"during the drain delay"
        # Then the sessions are told to go elsewhere.
        assert_draining(await ended_with(receiving), "relay-1")
        ended = time.monotonic()
        assert ended - signalled >= DRAIN_DELAY * 0.9, "sessions ended before the delay"
        assert_draining(await ended_with(sending), "relay-1")
    code = await asyncio.to_thread(relayd.proc.wait, DRAIN_DELAY + DEFAULT_GRACE_SECONDS + 10)
    exited = time.monotonic() - signalled
    assert code == 0, relayd.log()
    assert exited < DRAIN_DELAY + DEFAULT_GRACE_SECONDS + 2, f"took {exited:.1f} s"
    log = relayd.log()
    assert "SIGTERM: draining" in log
    assert "ended 2 device sessions with NODE_DRAINING" in log
    assert "Traceback" not in log, log


async def test_a_second_signal_cuts_the_drain_delay_short(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path / "data", drain_delay=600)
    await relayd.start()
    try:
        assert relayd.proc is not None
        async with grpc.aio.insecure_channel(relayd.relay_address) as channel:
            watch = asyncio.create_task(not_serving(channel))
            started = time.monotonic()
            relayd.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await watch
        relayd.proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(relayd.proc.wait, 30)
        assert code == 0, relayd.log()
        assert time.monotonic() - started < DEFAULT_GRACE_SECONDS + 5
    finally:
        relayd.stop()
