"""SIGKILL the relay mid-traffic; a restart on the same data loses no acknowledged message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from relaypb.relay.v1 import relay_pb2
from tests.process import Relayd
from tests.support import connect, envelope, register

pytestmark = pytest.mark.integration


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator[Relayd]:
    proc = Relayd(tmp_path / "data")
    yield proc
    proc.stop()


async def test_sigkill_loses_no_acknowledged_message(relayd: Relayd) -> None:
    await relayd.start()
    alice = await register(relayd.keys_address, "alice")
    bob = await register(relayd.keys_address, "bob")
    acked: list[bytes] = []
    killed = asyncio.Event()

    async def traffic() -> None:
        async with grpc.aio.insecure_channel(relayd.relay_address) as channel:
            a = await connect(channel, alice, receive=False)
            try:
                for i in range(100_000):
                    batch = [envelope(bob.address, b"%d.%d" % (i, j)) for j in range(5)]
                    results = await a.send(*batch)
                    acked.extend(
                        r.message_id for r in results if r.outcome == relay_pb2.OUTCOME_STORED
                    )
                    if len(acked) >= 500 and not killed.is_set():
                        relayd.kill()  # sends are still in flight on the stream
                        killed.set()
            except (grpc.aio.AioRpcError, EOFError, TimeoutError):
                pass  # the node died under us: these sends were never acknowledged
            finally:
                await a.close()

    await asyncio.wait_for(traffic(), 120)
    assert killed.is_set()
    assert len(acked) >= 500

    await relayd.start()  # same data dir, new process
    async with grpc.aio.insecure_channel(relayd.relay_address) as channel:
        b = await connect(channel, bob)
        received = [e.message_id for e in await b.until_queue_empty()]
        await b.close()
    missing = set(acked) - set(received)
    assert not missing, f"{len(missing)} acknowledged messages lost"
    # FIFO: the acknowledged ones arrive in the order they were sent.
    order = {mid: n for n, mid in enumerate(received)}
    assert [order[m] for m in acked] == sorted(order[m] for m in acked)
