"""A device that stops reading cannot grow the relay, and a stalled stream is ended.

A real ``relayd run``; bob's stream is authenticated and then never read again (HTTP/2
flow control fills up), while bob keeps acking the ids he knows of (the test tells
him). Alice pushes 400 envelopes of 200 KiB (80 MiB) at him. The scenario lives in
``loadtest/slowreader.py``: ``make bench`` measures the same growth as
``rss_mb_slow_reader``.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

import grpc
import pytest

from loadtest import slowreader
from loadtest.slowreader import BATCH, COUNT, ENVELOPE, INFLIGHT_BYTES, RSS_BOUND_MB
from relaypb.relay.v1 import relay_pb2
from tests.process import Relayd
from tests.support import Device, channel_to, connect, envelope, register

pytestmark = pytest.mark.integration


async def start(tmp_path: Path, limits: dict[str, int]) -> Relayd:
    config = tmp_path / "relay.toml"
    config.write_text(slowreader.limits_toml(limits), encoding="utf-8")
    relayd = Relayd(tmp_path / "data", config=config)
    await relayd.start()
    return relayd


async def until_sessions(relayd: Relayd, receiving: int, timeout: float = 30) -> None:
    """Wait until the relay's ``relay_sessions{kind="receive"}`` gauge says ``receiving``."""
    wanted = f'relay_sessions{{kind="receive"}} {float(receiving)}'
    async with asyncio.timeout(timeout):
        while True:
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(relayd.metrics_url, timeout=5).read().decode()
            )
            if wanted in text.splitlines():
                return
            await asyncio.sleep(0.1)  # polling the relay's own gauge, bounded above


async def test_a_device_that_stops_reading_does_not_grow_the_relay(tmp_path: Path) -> None:
    relayd = await start(tmp_path, slowreader.LIMITS)
    try:
        assert relayd.proc is not None
        got = await slowreader.measure(relayd.relay_address, relayd.keys_address, relayd.proc.pid)
        print(
            f"rss_mb_slow_reader={got.growth_mib:.1f} (base {got.base_mib:.1f} MiB, "
            f"peak {got.peak_mib:.1f} MiB, {got.source})"
        )
        assert len(got.outcomes) == COUNT
        assert set(got.outcomes) <= {relay_pb2.OUTCOME_DELIVERED, relay_pb2.OUTCOME_STORED}
        assert got.count(relay_pb2.OUTCOME_STORED) > COUNT // 2  # the rest waits
        assert got.growth_mib < RSS_BOUND_MB, f"relay grew {got.growth_mib:.1f} MiB"
    finally:
        relayd.stop()


async def test_a_stalled_stream_is_ended_and_nothing_is_lost(tmp_path: Path) -> None:
    limits = {"write_stall_seconds": 1, "max_session_inflight_bytes": INFLIGHT_BYTES}
    relayd = await start(tmp_path, limits)
    try:
        alice = await register(relayd.keys_address, "alice")
        bob = await register(relayd.keys_address, "bob")
        async with (
            channel_to(relayd.relay_address) as ch_a,
            channel_to(relayd.relay_address) as ch_b,
        ):
            b = await slowreader.connect_unread(
                ch_b, slowreader.identity(bob.address, bob.signing_key)
            )
            a = await connect(ch_a, alice)
            sent: list[bytes] = []
            for _ in range(10):  # 20 MiB: more than the transport takes unread
                envs = [envelope(bob.address, os.urandom(ENVELOPE)) for _ in range(BATCH)]
                sent += [e.message_id for e in envs]
                results = await a.send(*envs)
                assert all(r.outcome == relay_pb2.OUTCOME_STORED for r in results)
            # The relay gives up on the stream (its status waits behind the unread data).
            await until_sessions(relayd, 1)  # alice's only: bob's session is gone
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    assert await asyncio.wait_for(b.call.read(), 30) is not grpc.aio.EOF
            assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "limits.write_stall_seconds" in (ended.value.details() or "")
            # Bob comes back and reads: everything is there, once, in order.
            again = await connect(ch_b, Device(bob.address, bob.signing_key))
            got = [e.message_id for e in await again.until_queue_empty()]
            assert got == sent
            await again.close()
            await a.close()
    finally:
        relayd.stop()
