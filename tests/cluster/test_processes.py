"""``relayd relay --processes 3``: three nodes on one port; one SIGKILLed mid-traffic."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyserver.app import KeyserverApp
from relay.sdk import DeviceState, RelayClient
from relay.sdk.backoff import ExponentialBackoff
from relay.sdk.session import CHANNEL_OPTIONS
from relay.stores.redis_presence import RedisPresence
from tests.cluster.conftest import write_toml
from tests.cluster.traffic import Traffic
from tests.conftest import test_config as config_of
from tests.process import Relayd
from tests.sdk.helpers import provision

pytestmark = [pytest.mark.services, pytest.mark.integration]

NODE = "relay-p"
CHILDREN = [f"{NODE}-{i}" for i in range(3)]


@dataclass
class OwnConnections(Traffic):
    """Traffic whose devices each hold a TCP connection of their own, as separate devices
    do: grpc would otherwise share one connection among the channels of this process to
    one target, and the kernel would hand all of them to one relay process."""

    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def start(self) -> None:
        for i in range(self.devices):
            home = self.home / f"d{i}"
            self.addresses.append(await provision(self.keys_address, home, f"user{i}"))
            state = DeviceState.open(home)
            self.states.append(state)
            (target,) = self.targets(i)
            channel = grpc.aio.insecure_channel(
                target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            )
            self.channels.append(channel)
            client = RelayClient(state, channel, backoff=ExponentialBackoff(base=0.05, cap=0.5))
            await client.__aenter__()
            self.clients.append(client)
            self._readers.append(asyncio.create_task(self._read(i)))

    async def close(self) -> None:
        await super().close()
        for channel in self.channels:
            await channel.close()


def free_ports(count: int) -> int:
    """A port P with P .. P+count-1 free now (child i serves metrics on P + i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            probes = []
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise AssertionError("no run of free ports")


async def wait_for(condition: Any, what: str, seconds: float = 60) -> Any:
    """Poll async ``condition`` until it returns something true; return that."""
    for _ in range(int(seconds / 0.1)):
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.1)  # polling presence or a log, not ordering events
    raise AssertionError(f"not within {seconds} s: {what}")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


def full_log(relayd: Relayd) -> str:
    """Everything the supervisor and its children logged."""
    return relayd.log_path.read_text() if relayd.log_path else ""


def started_pids(relayd: Relayd, index: int) -> list[int]:
    """The pids the supervisor logged for child ``index``, oldest first."""
    pattern = rf"relay process {index} \(node {NODE}-{index}\) started: pid (\d+)"
    return [int(m) for m in re.findall(pattern, full_log(relayd))]


@dataclass
class Host:
    relayd: Relayd
    keys_address: str
    presence: RedisPresence
    metrics_port: int


@pytest.fixture
async def host(cluster_overrides: dict[str, Any], tmp_path: Path) -> AsyncIterator[Host]:
    """``relayd relay --processes 3`` on Cassandra and Redis, a key directory in-process."""
    cfg = config_of(tmp_path / "keys", **cluster_overrides)
    metrics_port = free_ports(3)
    async with KeyserverApp(cfg) as keys, RedisPresence(cfg.presence) as presence:
        settings = {
            **cluster_overrides,
            "keyserver.target": keys.address,
            "node.grace_seconds": 1.0,
            "node.drain_delay_seconds": 0.0,
        }
        config = write_toml(tmp_path / "relay.toml", settings)
        relayd = Relayd(
            tmp_path / "host" / "data",
            command="relay",
            config=config,
            node_id=NODE,
            metrics_port=metrics_port,  # child i serves on metrics_port + i
            extra_args=["--processes", "3"],
        )
        try:
            await relayd.start()
            yield Host(relayd, keys.address, presence, metrics_port)
        finally:
            relayd.stop()


async def test_three_processes_share_a_port_and_a_sigkilled_one_is_replaced(
    host: Host, tmp_path: Path
) -> None:
    relayd, presence = host.relayd, host.presence

    async def all_alive() -> bool:
        return all([await presence.node_address(n) for n in CHILDREN])

    await wait_for(all_alive, f"{CHILDREN} alive in presence", 90)
    # Each child serves its own metrics, on the configured port plus its index.
    for i in range(3):
        url = f"http://127.0.0.1:{host.metrics_port + i}/metrics"
        body = await asyncio.to_thread(fetch, url)
        assert b"# TYPE" in body
    assert all(len(started_pids(relayd, i)) == 1 for i in range(3)), relayd.log()

    traffic = OwnConnections(
        host.keys_address, tmp_path / "devices", lambda i: [relayd.relay_address], devices=30
    )
    try:
        await traffic.start()
        where = await presence.locate(traffic.addresses)
        assert {loc.node_id for loc in where.values()} == set(CHILDREN), where
        assert {c.node_id for c in traffic.clients} == set(CHILDREN)
        victim = 1
        (pid,) = started_pids(relayd, victim)
        moved = [i for i, c in enumerate(traffic.clients) if c.node_id == CHILDREN[victim]]
        epochs = {i: traffic.clients[i].session_epoch for i in moved}
        killed: list[int] = []

        def kill_once(acked: int) -> None:
            if acked >= 1000 and not killed:
                os.kill(pid, signal.SIGKILL)  # sends in flight on it
                killed.append(acked)

        await traffic.send(3000, on_acked=kill_once)
        assert killed, "the child was never killed"
        await traffic.wait_delivered(90)
        assert traffic.check() == 3000  # every acknowledged message exactly once, in order

        async def restarted() -> list[int]:
            pids = started_pids(relayd, victim)
            return pids if len(pids) == 2 else []

        (_, new_pid) = await wait_for(restarted, "the killed child restarted", 60)
        assert new_pid != pid
        assert (
            f"relay process {victim} (node {CHILDREN[victim]}) (pid {pid}) exited "
            "unexpectedly: exit code -9 (killed by SIGKILL)"
        ) in full_log(relayd)
        await wait_for(all_alive, "the restarted child alive in presence", 60)
        # The killed child's devices reconnected: a new session each, where presence says.
        where = await presence.locate([traffic.addresses[i] for i in moved])
        for i in moved:
            client = traffic.clients[i]
            assert client.session_epoch != epochs[i]
            assert where[traffic.addresses[i]].epoch == client.session_epoch
            assert where[traffic.addresses[i]].node_id == client.node_id
        assert all(len(started_pids(relayd, i)) == 1 for i in (0, 2))  # siblings untouched
    finally:
        await traffic.close()
    children = [started_pids(relayd, i)[-1] for i in range(3)]
    assert relayd.stop() == 0, relayd.log()  # SIGTERM: forwarded, children exit cleanly
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    assert full_log(relayd).count("stopped: exit code 0") == 3, relayd.log()
