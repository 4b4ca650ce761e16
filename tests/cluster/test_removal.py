"""Removing a device takes effect on every relay node at once.

The key directory announces the removal (Redis pub/sub in a cluster, in-process with
``relayd run``); every node ends the device's sessions (PERMISSION_DENIED with reason
DEVICE_REMOVED), forgets its cached key, so a new Connect is refused, and purges its
queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from keyserver.app import KeyserverApp
from relay.clock import SystemClock
from relay.common.cassandra.session import CassandraSession
from relay.common.device_events import LocalDeviceEvents
from relay.common.status import error_info
from relay.errors import DeviceRemoved
from relay.model import Address
from relay.sdk.status import from_rpc_error, is_retryable
from relay.server.app import RelayApp
from relay.stores.cassandra.queue import CassandraQueue
from relay.stores.sqlite_queue import SqliteQueue
from relaypb.relay.v1 import relay_pb2
from tests.cluster.conftest import Cluster
from tests.conftest import test_config as config_in
from tests.support import Device, RawSession, connect, envelope, register, remove

#: How soon after RemoveDevice answers a session of the device must end, on any node.
END_WITHIN_SECONDS = 1.0


async def _ends_removed(session: RawSession) -> grpc.aio.AioRpcError:
    """The status the stream of ``session`` ends with, within END_WITHIN_SECONDS."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(session.frame(), END_WITHIN_SECONDS)
    error = info.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    detail = error_info(error)
    assert detail is not None and detail.reason == "DEVICE_REMOVED"
    assert "was removed from the device list of default/bob" in (error.details() or "")
    return error


async def _refused(channel: grpc.aio.Channel, device: Device) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await connect(channel, device)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _watch_removals(nodes: list[RelayApp]) -> Callable[[], Awaitable[None]]:
    """Wrap each node's ``Relay.device_removed``; the result waits until all ran once."""
    done = [asyncio.Event() for _ in nodes]
    for node, event in zip(nodes, done, strict=True):
        assert node.relay is not None
        real = node.relay.device_removed

        async def observed(
            device: Address,
            real: Callable[[Address], Awaitable[int]] = real,
            event: asyncio.Event = event,
        ) -> int:
            try:
                return await real(device)
            finally:
                event.set()

        node.relay.device_removed = observed  # type: ignore[method-assign]

    async def all_done() -> None:
        await asyncio.gather(*(e.wait() for e in done))

    return all_done


async def _store_for(sender: RawSession, device: Address, count: int) -> None:
    results = await sender.send(*[envelope(device, b"m%d" % i) for i in range(count)])
    assert [r.outcome for r in results] == [relay_pb2.OUTCOME_STORED] * count


@pytest.mark.services
async def test_removal_takes_effect_on_every_node(cluster: Cluster) -> None:
    keys = cluster.keys_address
    alice = await register(keys, "alice")
    bob1 = await register(keys, "bob")
    bob2 = await register(keys, "bob")  # linked, approved by bob/1
    assert bob2.address == Address("default", "bob", 2)
    removals_done = _watch_removals(cluster.nodes)
    async with AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(a)) for a in cluster.addresses
        ]
        a = await connect(channels[0], alice, receive=False)
        await _store_for(a, bob2.address, 3)
        receiving = await connect(channels[2], bob2)
        assert len(await receiving.until_queue_empty()) == 3  # delivered, not acked: stored
        sending = await connect(channels[1], bob2, receive=False)
        bob1_session = await connect(channels[1], bob1)
        await bob1_session.until_queue_empty()

        await remove(keys, bob2.address)
        await _ends_removed(receiving)
        await _ends_removed(sending)
        await asyncio.wait_for(removals_done(), 10)

        for channel in channels:
            await _refused(channel, bob2)
        async with CassandraSession(cluster.config.cassandra) as session:
            queue = CassandraQueue(session, SystemClock())
            assert (await queue.read(bob2.address, 0, 100, 0)).items == ()
        # The user's other device is untouched and still reachable.
        (res,) = await a.send(envelope(bob1.address, b"still here"))
        assert res.outcome == relay_pb2.OUTCOME_STORED
        (got,) = await bob1_session.receive(1)
        assert got.content == b"still here"
        (late,) = await a.send(envelope(bob2.address, b"too late"))
        assert late.code == grpc.StatusCode.NOT_FOUND.value[0]
        for s in (a, receiving, sending, bob1_session):
            await s.close()


@dataclasses.dataclass
class Embedded:
    keys: KeyserverApp
    relay: RelayApp
    queue_path: Path


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Embedded]:
    """``relayd run`` in this process: SQLite, one LocalDeviceEvents shared by both apps."""
    cfg = config_in(tmp_path / "data")
    events = LocalDeviceEvents()
    async with KeyserverApp(cfg, events=events) as keys:
        cfg = dataclasses.replace(
            cfg, keyserver=dataclasses.replace(cfg.keyserver, target=keys.address)
        )
        async with RelayApp(cfg, events=events) as relay:
            yield Embedded(keys, relay, cfg.storage.path / "queue.db")


async def test_removal_in_one_process(embedded: Embedded) -> None:
    keys = embedded.keys.address
    alice = await register(keys, "alice")
    await register(keys, "bob")
    bob2 = await register(keys, "bob")
    async with grpc.aio.insecure_channel(embedded.relay.address) as channel:
        a = await connect(channel, alice, receive=False)
        await _store_for(a, bob2.address, 2)
        receiving = await connect(channel, bob2)
        assert len(await receiving.until_queue_empty()) == 2
        sending = await connect(channel, bob2, receive=False)

        # In one process the relay acts before RemoveDevice answers.
        await remove(keys, bob2.address)
        error = await _ends_removed(receiving)
        await _ends_removed(sending)
        # The SDK raises DeviceRemoved for it and does not reconnect.
        assert isinstance(from_rpc_error(error), DeviceRemoved)
        assert not is_retryable(error)

        await _refused(channel, bob2)
        async with SqliteQueue(embedded.queue_path) as queue:
            assert (await queue.read(bob2.address, 0, 100, 0)).items == ()
            assert await queue.depth(bob2.address) == (0, 0)
        for s in (a, receiving, sending):
            await s.close()
