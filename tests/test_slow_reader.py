"""A device that stops reading cannot grow the relay, and a stalled stream is ended.

A real ``relayd run``; bob's stream is authenticated and then never read again (HTTP/2
flow control fills up), while bob keeps acking the ids he knows of (the test tells
him). Alice pushes 400 envelopes of 200 KiB (80 MiB) at him.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

import grpc
import pytest

from relay import authproof
from relay.common.convert import address_to_pb
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.process import Relayd
from tests.support import Device, RawSession, channel_to, connect, envelope, register

pytestmark = pytest.mark.integration

ENVELOPE = 200 * 1024
COUNT = 400
BATCH = 10
INFLIGHT_BYTES = 4 * 1024 * 1024
#: RSS growth allowed while 80 MiB go to a device that reads nothing: the session's two
#: 4 MiB budgets (direct, pushed), a Deliver frame stuck in the transport, SQLite's page
#: cache and allocator slack.
RSS_BOUND_MB = 48


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def start(tmp_path: Path, **limits: float) -> Relayd:
    config = tmp_path / "relay.toml"
    config.write_text(
        "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()), encoding="utf-8"
    )
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


async def connect_unread(channel: grpc.aio.Channel, device: Device) -> RawSession:
    """A receiving session authenticated, then never read again (not even its status)."""
    call = relay_pb2_grpc.RelayStub(channel).Connect()
    await call.write(
        relay_pb2.ClientFrame(
            hello=relay_pb2.Hello(address=address_to_pb(device.address), receive=True)
        )
    )
    ch = (await call.read()).challenge
    transcript = authproof.connect_transcript(
        ch.nonce, ch.node_id, ch.server_time_ms, device.address
    )
    await call.write(
        relay_pb2.ClientFrame(
            auth=relay_pb2.AuthResponse(signature=device.signing_key.sign(transcript))
        )
    )
    ready = await call.read()
    assert ready.WhichOneof("frame") == "ready"
    assert (await call.read()).WhichOneof("frame") == "queue_empty"
    return RawSession(call, ready.ready)


async def push(alice: RawSession, bob: RawSession, bob_address: object, n: int) -> list[int]:
    """One batch from alice; bob acks its ids while alice waits for her answers."""
    envs = [envelope(bob_address, os.urandom(ENVELOPE)) for _ in range(n)]  # type: ignore[arg-type]
    sending = asyncio.ensure_future(alice.send(*envs))
    await bob.ack(*(e.message_id for e in envs))
    return [r.outcome for r in await sending]


async def test_a_device_that_stops_reading_does_not_grow_the_relay(tmp_path: Path) -> None:
    relayd = await start(
        tmp_path,
        max_session_inflight_bytes=INFLIGHT_BYTES,
        write_stall_seconds=600,
        max_queue_bytes=1024 * 1024 * 1024,
    )
    try:
        alice = await register(relayd.keys_address, "alice")
        bob = await register(relayd.keys_address, "bob")
        async with (
            channel_to(relayd.relay_address) as ch_a,
            channel_to(relayd.relay_address) as ch_b,
        ):
            b = await connect_unread(ch_b, bob)
            a = await connect(ch_a, alice)
            await push(a, b, bob.address, 1)  # warm up: the first envelope of a stream is stored
            assert relayd.proc is not None
            base = peak = rss_mb(relayd.proc.pid)
            outcomes: list[int] = []
            for _ in range(COUNT // BATCH):
                outcomes += await push(a, b, bob.address, BATCH)
                peak = max(peak, rss_mb(relayd.proc.pid))
            growth = peak - base
            print(f"rss_mb_slow_reader={growth:.1f} (base {base:.1f} MiB, peak {peak:.1f} MiB)")
            assert set(outcomes) <= {relay_pb2.OUTCOME_DELIVERED, relay_pb2.OUTCOME_STORED}
            assert outcomes.count(relay_pb2.OUTCOME_STORED) > COUNT // 2  # the rest waits
            assert growth < RSS_BOUND_MB, f"relay grew {growth:.1f} MiB"
            await a.close()
            await b.close()
    finally:
        relayd.stop()


async def test_a_stalled_stream_is_ended_and_nothing_is_lost(tmp_path: Path) -> None:
    relayd = await start(tmp_path, write_stall_seconds=1, max_session_inflight_bytes=INFLIGHT_BYTES)
    try:
        alice = await register(relayd.keys_address, "alice")
        bob = await register(relayd.keys_address, "bob")
        async with (
            channel_to(relayd.relay_address) as ch_a,
            channel_to(relayd.relay_address) as ch_b,
        ):
            b = await connect_unread(ch_b, bob)
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
            again = await connect(ch_b, bob)
            got = [e.message_id for e in await again.until_queue_empty()]
            assert got == sent
            await again.close()
            await a.close()
    finally:
        relayd.stop()
