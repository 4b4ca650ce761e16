"""Routing across relay nodes: live envelopes over node links, displacement across nodes."""

from __future__ import annotations

import grpc
import pytest

from relay.common.status import error_info
from relaypb.relay.v1 import relay_pb2
from tests.cluster.conftest import Cluster
from tests.support import connect, envelope, register

pytestmark = [pytest.mark.services, pytest.mark.integration]


def link_batches(cluster: Cluster, node: int) -> float:
    total = 0.0
    for metric in cluster.nodes[node].metrics.link_batches.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


async def test_live_envelopes_cross_nodes_in_order(cluster: Cluster) -> None:
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    async with (
        grpc.aio.insecure_channel(cluster.addresses[0]) as ch0,
        grpc.aio.insecure_channel(cluster.addresses[1]) as ch1,
    ):
        b = await connect(ch1, bob)
        await b.until_queue_empty()
        a = await connect(ch0, alice)
        await a.until_queue_empty()
        before = link_batches(cluster, 0)
        for i in range(100):
            (res,) = await a.send(envelope(bob.address, b"%d" % i))
            assert res.outcome == relay_pb2.OUTCOME_STORED
        got = await b.receive(100)
        assert [e.content for e in got] == [b"%d" % i for i in range(100)]
        assert link_batches(cluster, 0) > before  # they travelled over the node link
        # and back the other way
        await b.send(envelope(alice.address, b"pong"))
        (pong,) = await a.receive(1)
        assert pong.content == b"pong"
        await a.close()
        await b.close()


async def test_displacement_across_nodes(cluster: Cluster) -> None:
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    async with (
        grpc.aio.insecure_channel(cluster.addresses[1]) as ch1,
        grpc.aio.insecure_channel(cluster.addresses[2]) as ch2,
    ):
        old = await connect(ch1, bob)
        await old.until_queue_empty()
        new = await connect(ch2, bob)
        await new.until_queue_empty()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await old.frame()
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert new.ready.session_epoch > old.ready.session_epoch
        # The old node checked the displacement against presence, and says who took over.
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "SESSION_DISPLACED"
        assert detail.metadata["session_epoch"] == str(new.ready.session_epoch)
        a = await connect(ch1, alice, receive=False)
        await a.send(envelope(bob.address, b"to node 2"))
        (got,) = await new.receive(1)
        assert got.content == b"to node 2"
        await a.close()
        await new.close()


async def test_ephemeral_crosses_nodes_only_when_online(cluster: Cluster) -> None:
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    async with (
        grpc.aio.insecure_channel(cluster.addresses[0]) as ch0,
        grpc.aio.insecure_channel(cluster.addresses[2]) as ch2,
    ):
        a = await connect(ch0, alice, receive=False)
        (off,) = await a.send(envelope(bob.address, b"typing", ephemeral=True))
        assert off.outcome == relay_pb2.OUTCOME_RECIPIENT_OFFLINE
        b = await connect(ch2, bob)
        await b.until_queue_empty()
        (on,) = await a.send(envelope(bob.address, b"typing", ephemeral=True))
        assert on.outcome == relay_pb2.OUTCOME_DELIVERED
        (got,) = await b.receive(1)
        assert got.content == b"typing" and got.ephemeral
        await a.close()
        await b.close()
