"""The direct path across real relay nodes: Cassandra, Redis presence, gRPC node links.

A sender on node 0, a recipient on node 1 that acks what it gets: envelopes travel
node 0 -> node 1 unstored and are answered DELIVERED once node 1 reports the acks; a
recipient that stops acking and leaves gets them STORED, and its next session reads them
from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from relaypb.relay.v1 import relay_pb2
from tests.cluster.conftest import Cluster
from tests.support import Device, RawSession, connect, envelope, register

pytestmark = [pytest.mark.services, pytest.mark.integration]


@pytest.fixture
def cluster_overrides(cluster_overrides: dict[str, Any]) -> dict[str, Any]:
    """A wide ack window: the acks cross two links on a loaded test machine."""
    return {**cluster_overrides, "limits.direct_ack_ms": 10_000}


def copies(cluster: Cluster, node: int, path: str) -> float:
    value = cluster.nodes[node].metrics.registry.get_sample_value(
        "relay_envelope_copies_total", {"path": path}
    )
    return value or 0.0


@contextlib.asynccontextmanager
async def acking(session: RawSession, got: list[bytes]) -> AsyncIterator[asyncio.Event]:
    """Ack every delivered envelope as it comes, recording contents; set the event per frame."""
    frame_seen = asyncio.Event()

    async def run() -> None:
        while True:
            f = await session.frame(60)
            if f.WhichOneof("frame") == "deliver":
                got.extend(e.content for e in f.deliver.envelopes)
                await session.ack(*(e.message_id for e in f.deliver.envelopes))
                frame_seen.set()

    task = asyncio.create_task(run())
    try:
        yield frame_seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Online:
    """alice's receiving session on node 0, bob's on node 1 (both caught up)."""

    bob: Device
    a: RawSession
    b: RawSession
    channels: list[grpc.aio.Channel]


@pytest.fixture
async def online(cluster: Cluster) -> AsyncIterator[Online]:
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(address))
            for address in cluster.addresses
        ]
        b = await connect(channels[1], bob)
        await b.until_queue_empty()
        a = await connect(channels[0], alice)
        await a.until_queue_empty()
        yield Online(bob, a, b, channels)
        await a.close()
        await b.close()


async def test_envelopes_go_direct_across_nodes(cluster: Cluster, online: Online) -> None:
    """Nothing is stored: even the stream's first envelope to bob goes direct (after a
    queue read of bob's session on node 1) and every one is answered DELIVERED."""
    a, b, bob = online.a, online.b, online.bob
    got: list[bytes] = []
    async with acking(b, got):
        sent = [b"first"]
        (res,) = await a.send(envelope(bob.address, sent[0]))
        assert res.outcome == relay_pb2.OUTCOME_DELIVERED
        later = [b"later %d" % i for i in range(20)]
        results = await a.send(*(envelope(bob.address, c) for c in later))
        sent += later
        assert [r.outcome for r in results] == [relay_pb2.OUTCOME_DELIVERED] * 20
        # DELIVERED means bob acked it: all of them are in, in send order.
        assert got[: len(sent)] == sent
    assert copies(cluster, 0, "direct") == 21
    assert copies(cluster, 0, "stored") == 0


async def test_a_recipient_leaving_gets_its_direct_envelopes_from_the_queue(
    online: Online,
) -> None:
    a, b, bob = online.a, online.b, online.bob
    got: list[bytes] = []
    async with acking(b, got):
        (res,) = await a.send(envelope(bob.address, b"proof"))
        assert res.outcome == relay_pb2.OUTCOME_DELIVERED
    # bob reads but no longer acks: the next one is pushed direct and held.
    answer = asyncio.create_task(a.send(envelope(bob.address, b"held")))
    (held,) = await b.receive(1)
    assert held.content == b"held"
    assert not answer.done()  # no ack: no answer (durable before ack)
    await b.close()  # node 1 reports the session's end: stored well before 10 s
    (res,) = await asyncio.wait_for(answer, 8)
    assert res.outcome == relay_pb2.OUTCOME_STORED
    again = await connect(online.channels[2], bob)
    queued = await again.until_queue_empty()
    assert [e.content for e in queued] == [b"held"]
    await again.close()
