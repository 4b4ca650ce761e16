"""Failures mid-traffic: a relay node SIGKILLed, Redis restarted, Cassandra stopped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from relaypb.relay.v1 import relay_pb2
from tests.cluster.conftest import Cluster, ProcCluster
from tests.cluster.traffic import Traffic
from tests.services import control
from tests.support import connect, envelope, register

pytestmark = [pytest.mark.services, pytest.mark.integration]


def spread(addresses: list[str]):  # type: ignore[no-untyped-def]
    """Device i starts on node i % n and fails over to the next ones."""
    return lambda i: [addresses[(i + k) % len(addresses)] for k in range(len(addresses))]


@pytest.fixture
async def traffic(tmp_path: Path) -> AsyncIterator[list[Traffic]]:
    holder: list[Traffic] = []
    yield holder
    for t in holder:
        await t.close()


async def test_sigkill_a_node_mid_traffic_loses_nothing(
    proc_cluster: ProcCluster, tmp_path: Path, traffic: list[Traffic]
) -> None:
    t = Traffic(
        proc_cluster.keys_address, tmp_path / "devices", spread(proc_cluster.addresses), devices=30
    )
    traffic.append(t)
    await t.start()
    victim = proc_cluster.nodes[1]
    killed = []

    def kill_once(acked: int) -> None:
        if acked >= 1000 and not killed:
            victim.kill()  # SIGKILL, sends in flight on it
            killed.append(acked)

    await t.send(3000, on_acked=kill_once)
    assert killed, "the node was never killed"
    await t.wait_delivered(90)
    assert t.check() == 3000
    # every device that was on the dead node now has a session on a live one
    assert all(c.node_id != "relay-1" for c in t.clients)


@pytest.mark.disruptive
async def test_redis_restart_mid_traffic_loses_nothing(
    cluster: Cluster, tmp_path: Path, traffic: list[Traffic]
) -> None:
    t = Traffic(cluster.keys_address, tmp_path / "devices", spread(cluster.addresses), devices=20)
    traffic.append(t)
    await t.start()
    restarted = []

    async def restart_when(event: asyncio.Event) -> None:
        await event.wait()
        await asyncio.to_thread(control, "stop-redis")
        await asyncio.to_thread(control, "start-redis")
        restarted.append(True)

    halfway = asyncio.Event()
    restarter = asyncio.create_task(restart_when(halfway))
    await t.send(2000, on_acked=lambda n: halfway.set() if n >= 500 else None)
    await restarter
    assert restarted
    await t.wait_delivered(90)
    assert t.check() == 2000


@pytest.mark.disruptive
async def test_cassandra_down_sends_unavailable_never_acked(cluster: Cluster) -> None:
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    async with grpc.aio.insecure_channel(cluster.addresses[0]) as channel:
        a = await connect(channel, alice, receive=False)
        (ok,) = await a.send(envelope(bob.address, b"before"))
        assert ok.outcome == relay_pb2.OUTCOME_STORED
        await asyncio.to_thread(control, "stop-cassandra")
        try:
            down = envelope(bob.address, b"during")
            (res,) = await a.send(down)
            assert res.outcome == relay_pb2.OUTCOME_REJECTED
            assert res.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "Cassandra" in res.message or "cassandra" in res.message
        finally:
            await asyncio.to_thread(control, "start-cassandra")
        # Traffic resumes: the same envelope, retried as the SDK would, is stored once.
        # The driver reconnects at most RECONNECT_MAX_SECONDS after the node answers.
        for _ in range(150):
            (res,) = await a.send(down)
            if res.outcome == relay_pb2.OUTCOME_STORED:
                break
            assert res.code == grpc.StatusCode.UNAVAILABLE.value[0]
            await asyncio.sleep(0.2)  # retry backoff while the driver reconnects
        assert res.outcome == relay_pb2.OUTCOME_STORED
        b = await connect(channel, bob)
        got = await b.until_queue_empty()
        assert [e.content for e in got] == [b"before", b"during"]
        await a.close()
        await b.close()
