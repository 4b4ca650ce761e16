"""SIGTERM one of three ``relayd relay`` processes mid-traffic: a graceful drain.

Real Redis presence and Cassandra queues. While SDK devices send and receive, node
relay-1 gets SIGTERM: its health says NOT_SERVING for the drain delay (it keeps
serving), then its devices are told NODE_DRAINING and are back, Ready on another node,
within 2 s; no SDK caller sees a send error and no acknowledged message is lost.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyserver.app import KeyserverApp
from relay.sdk import RelayClient
from tests.cluster.conftest import ProcCluster, write_toml
from tests.cluster.traffic import Traffic
from tests.conftest import test_config as config_for
from tests.process import Relayd

pytestmark = [pytest.mark.services, pytest.mark.integration]

DRAIN_DELAY = 1.5
#: Messages sent across the drain: enough to outlast it on a fast relay (the direct path).
TOTAL = 12_000
GRACE = 2.0
#: The drained node's devices must be Ready elsewhere this soon after the delay.
BACK_WITHIN = 2.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def drain_cluster(
    cluster_overrides: dict[str, Any], tmp_path: Path
) -> AsyncIterator[ProcCluster]:
    """Three ``relayd relay`` processes that drain for DRAIN_DELAY s on SIGTERM."""
    cfg = config_for(tmp_path / "keys", **cluster_overrides)
    async with KeyserverApp(cfg) as keys:
        settings = {
            **cluster_overrides,
            "keyserver.target": keys.address,
            "node.grace_seconds": GRACE,
        }
        config = write_toml(tmp_path / "relay.toml", settings)
        nodes = [
            Relayd(
                tmp_path / f"node{i}" / "data",
                command="relay",
                config=config,
                node_id=f"relay-{i}",
                drain_delay=DRAIN_DELAY,
            )
            for i in range(3)
        ]
        try:
            for node in nodes:
                await node.start()
            yield ProcCluster(keys.address, nodes)
        finally:
            for node in nodes:
                node.stop()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Check ``condition`` every 10 ms until it holds; return when (monotonic).

    A bounded poll of state the SDK exposes no event for (which node a client is on),
    not a sleep standing in for an event.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic()


def on(client: RelayClient, node: str) -> bool:
    return client.node_id == node and client._ready.is_set() and client.error is None


async def test_sigterm_a_node_mid_traffic_drains_it_gracefully(
    drain_cluster: ProcCluster, tmp_path: Path
) -> None:
    addresses = drain_cluster.addresses
    t = Traffic(
        drain_cluster.keys_address,
        tmp_path / "devices",
        lambda i: [addresses[(i + k) % 3] for k in range(3)],
        devices=12,
    )
    await t.start()
    try:
        victim = drain_cluster.nodes[1]
        assert victim.proc is not None
        drained = [c for c in t.clients if c.node_id == "relay-1"]
        assert len(drained) == 4
        seen: dict[str, float] = {}
        acked_at: dict[str, int] = {}
        acked = 0

        async with grpc.aio.insecure_channel(victim.relay_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

            async def watch_health() -> None:
                async for reply in watch:
                    if reply.status == NOT_SERVING:
                        seen["not_serving"] = time.monotonic()
                        # Still serving during the delay: its devices are on it, Ready.
                        seen["still_on_it"] = sum(on(c, "relay-1") for c in drained)
                        return

            watcher = asyncio.create_task(watch_health())

            def count(n: int) -> None:
                nonlocal acked
                acked = n
                if n >= 500 and victim.proc is not None and "sigterm" not in seen:
                    seen["sigterm"] = time.monotonic()
                    acked_at["sigterm"] = n
                    victim.proc.send_signal(signal.SIGTERM)

            async def back_elsewhere() -> None:
                await until(lambda: "sigterm" in seen, 60, "SIGTERM sent")
                await until(
                    lambda: all(c.node_id != "relay-1" and c._ready.is_set() for c in drained),
                    DRAIN_DELAY + BACK_WITHIN + 1.0,
                    "every drained device Ready on another node",
                )
                seen["back"] = time.monotonic()
                acked_at["back"] = acked

            mover = asyncio.create_task(back_elsewhere())
            # Sending goes on across the whole drain: an error raises out of here.
            await t.send(TOTAL, on_acked=count)
            await mover
            async with asyncio.timeout(10):
                await watcher
            watch.cancel()

        assert "sigterm" in seen, "the node was never signalled"
        assert seen["not_serving"] - seen["sigterm"] < DRAIN_DELAY, "NOT_SERVING came late"
        assert seen["still_on_it"] == len(drained), "the node stopped serving during the delay"
        back = seen["back"] - seen["sigterm"]
        assert back < DRAIN_DELAY + BACK_WITHIN, f"devices back after {back:.2f} s"
        assert acked_at["back"] < TOTAL, "traffic ended before the drain: nothing was tested"
        await check_after(t, victim)
    finally:
        await t.close()


async def check_after(t: Traffic, victim: Relayd) -> None:
    """The victim exited 0, having ended its 4 sessions; nothing lost or reordered."""
    assert victim.proc is not None
    code = await asyncio.to_thread(victim.proc.wait, DRAIN_DELAY + GRACE + 10)
    assert code == 0, victim.log()
    await t.wait_delivered(60)
    assert t.check() == TOTAL
    assert all(c.node_id != "relay-1" for c in t.clients)
    assert all(c.error is None for c in t.clients)
    log = victim.log()
    assert "ended 4 device sessions with NODE_DRAINING" in log, log
