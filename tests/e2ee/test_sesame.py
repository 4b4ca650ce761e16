"""End-to-end encrypted messaging through a real relay and key directory (gRPC, port 0).

Sesame-style fan-out: a message reaches every device of the recipient and the sender's
other devices; the relay refuses an out-of-date device list and the SDK repairs its
sessions and retries by itself.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from relay.errors import NotFound, Unauthenticated
from relay.sdk import KeyDirectoryClient, RelayClient
from relay.sdk.device import remove_device
from relay.sdk.secure import SecureClient
from relay.sdk.session import Session
from relaypb.common.v1 import address_pb2
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.conftest import Servers, StartServers
from tests.e2ee.helpers import address, provision, record_seals, take
from tests.sdk.helpers import RecordingBackoff


@pytest.fixture
async def srv(start_servers: StartServers) -> Servers:
    # No identity cache: a removed device is refused at once.
    return await start_servers(**{"keyserver.identity_cache_seconds": 0.0})


async def test_a_message_reaches_every_device_of_both_users(srv: Servers, tmp_path: Path) -> None:
    a1, a2, b1, b2 = [
        await provision(srv.keys_address, tmp_path / name, "alice" if name[0] == "a" else "bob")
        for name in ("a1", "a2", "b1", "b2")
    ]
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                SecureClient(state, srv.relay_address, srv.keys_address)
            )
            for name, state in (("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2))
        }
        receipt = await clients["a1"].send("bob", b"hello bob")
        assert set(receipt.devices) == {address(b1), address(b2), address(a2)}
        # alice/2 was not in a1's view at first: the relay said "missing", a1 repaired.
        assert receipt.attempts == 2
        for name in ("b1", "b2"):
            [m] = await take(clients[name], 1)
            assert (m.sender, m.peer, m.outgoing, m.body) == (
                address(a1),
                "alice",
                False,
                b"hello bob",
            )
        [copy] = await take(clients["a2"], 1)
        assert (copy.sender, copy.peer, copy.outgoing, copy.body) == (
            address(a1),
            "bob",
            True,
            b"hello bob",
        )
        reply = await clients["b2"].send("alice", b"hi alice")
        assert set(reply.devices) == {address(a1), address(a2), address(b1)}
        for name in ("a1", "a2"):
            [m] = await take(clients[name], 1)
            assert (m.sender, m.body, m.outgoing) == (address(b2), b"hi alice", False)
        [copy] = await take(clients["b1"], 1)
        assert copy.outgoing and copy.peer == "alice"
        # Sessions are set up now: the next send needs one attempt.
        assert (await clients["a1"].send("bob", b"again")).attempts == 1
        for client in clients.values():
            assert client.relay.undecryptable == 0


async def test_new_device_is_found_and_removed_device_stops_receiving(
    srv: Servers, tmp_path: Path
) -> None:
    alice = await provision(srv.keys_address, tmp_path / "a", "alice")
    b1 = await provision(srv.keys_address, tmp_path / "b1", "bob")
    b2 = await provision(srv.keys_address, tmp_path / "b2", "bob")
    async with SecureClient(alice, srv.relay_address, srv.keys_address) as sender:
        first = await sender.send("bob", b"one")
        assert set(first.devices) == {address(b1), address(b2)}

        b3 = await provision(srv.keys_address, tmp_path / "b3", "bob")
        second = await sender.send("bob", b"two")
        assert set(second.devices) == {address(b1), address(b2), address(b3)}
        assert second.attempts == 2  # missing device 3 -> fetched its bundle, sent again

        async with grpc.aio.insecure_channel(srv.keys_address) as channel:
            await remove_device(b1, KeyDirectoryClient(channel), address(b2).device)
        third = await sender.send("bob", b"three")
        assert set(third.devices) == {address(b1), address(b3)}
        assert third.attempts == 2  # extra device 2 -> session dropped, sent again

    async with SecureClient(b3, srv.relay_address, srv.keys_address) as reader:
        assert [m.body for m in await take(reader, 2)] == [b"two", b"three"]
    async with SecureClient(b1, srv.relay_address, srv.keys_address) as reader:
        assert [m.body for m in await take(reader, 3)] == [b"one", b"two", b"three"]
    # The removed device can no longer open a session.
    with pytest.raises(Unauthenticated):
        async with RelayClient(b2, srv.relay_address, backoff=RecordingBackoff(0)):
            pass


async def test_reregistered_device_gets_a_fresh_session(srv: Servers, tmp_path: Path) -> None:
    alice = await provision(srv.keys_address, tmp_path / "a", "alice")
    old = await provision(srv.keys_address, tmp_path / "old", "bob")
    async with SecureClient(alice, srv.relay_address, srv.keys_address) as sender:
        await sender.send("bob", b"before")
        async with SecureClient(old, srv.relay_address, srv.keys_address) as reader:
            assert [m.body for m in await take(reader, 1)] == [b"before"]
        # Bob loses his phone: a new install registers, then removes the old device.
        new = await provision(srv.keys_address, tmp_path / "new", "bob")
        async with grpc.aio.insecure_channel(srv.keys_address) as channel:
            await remove_device(new, KeyDirectoryClient(channel), address(old).device)
        receipt = await sender.send("bob", b"after")
        assert set(receipt.devices) == {address(new)}
        assert receipt.attempts == 2  # new device missing and old one extra: one repair
    async with SecureClient(new, srv.relay_address, srv.keys_address) as reader:
        [m] = await take(reader, 1)
        assert m.body == b"after" and m.sender == address(alice)
        assert reader.relay.undecryptable == 0


async def test_unknown_user_is_not_found(srv: Servers, tmp_path: Path) -> None:
    alice = await provision(srv.keys_address, tmp_path / "a", "alice")
    async with SecureClient(alice, srv.relay_address, srv.keys_address) as sender:
        with pytest.raises(NotFound, match="nobody"):
            await sender.send("nobody", b"hello?")


async def test_tampered_and_replayed_envelopes_are_dropped_not_delivered(
    srv: Servers, tmp_path: Path
) -> None:
    """A device that sends garbage or replays an old envelope under a new id: the
    recipient drops it (counted), and keeps receiving the good messages after it."""
    alice = await provision(srv.keys_address, tmp_path / "a", "alice")
    bob = await provision(srv.keys_address, tmp_path / "b", "bob")
    async with SecureClient(alice, srv.relay_address, srv.keys_address) as sender:
        sealed = record_seals(sender)
        await sender.send("bob", b"first")
        # Replay the first envelope's content under a new message id, then flip a bit
        # of a fresh one, by writing raw frames on alice's own authenticated session.
        identity = alice.identity()
        assert identity is not None
        async with grpc.aio.insecure_channel(srv.relay_address) as channel:
            session = Session(relay_pb2_grpc.RelayStub(channel))
            await session.authenticate(identity, address(alice), receive=False)
            tampered = bytearray(sealed[0])
            tampered[-5] ^= 0x10
            frames = [
                relay_pb2.Envelope(
                    message_id=os.urandom(16),
                    recipient=address_pb2.Address(
                        tenant="default", user="bob", device=address(bob).device
                    ),
                    content=content,
                )
                for content in (sealed[0], bytes(tampered))
            ]
            await session.write(
                relay_pb2.ClientFrame(send=relay_pb2.SendBatch(batch_id=1, envelopes=frames))
            )
            results = (await session.read("send_results")).send_results
            assert [r.outcome for r in results.results] == [relay_pb2.OUTCOME_STORED] * 2
            session.cancel()
        await sender.send("bob", b"second")
    async with SecureClient(bob, srv.relay_address, srv.keys_address) as reader:
        assert [m.body for m in await take(reader, 2)] == [b"first", b"second"]
        assert reader.relay.undecryptable == 2


async def test_simultaneous_first_messages_converge(srv: Servers, tmp_path: Path) -> None:
    alice = await provision(srv.keys_address, tmp_path / "a", "alice")
    bob = await provision(srv.keys_address, tmp_path / "b", "bob")
    async with (
        SecureClient(alice, srv.relay_address, srv.keys_address) as a,
        SecureClient(bob, srv.relay_address, srv.keys_address) as b,
    ):
        await asyncio.gather(a.send("bob", b"hi bob"), b.send("alice", b"hi alice"))
        assert [m.body for m in await take(b, 1)] == [b"hi bob"]
        assert [m.body for m in await take(a, 1)] == [b"hi alice"]
        for i in range(5):
            await a.send("bob", b"a%d" % i)
            await b.send("alice", b"b%d" % i)
        assert [m.body for m in await take(b, 5)] == [b"a%d" % i for i in range(5)]
        assert [m.body for m in await take(a, 5)] == [b"b%d" % i for i in range(5)]
        assert a.relay.undecryptable == b.relay.undecryptable == 0


async def test_new_device_gets_the_next_message_with_default_settings(
    start_servers: StartServers, tmp_path: Path
) -> None:
    """Device lists are not cached by default: a relay that has just checked bob's list
    still sees the device bob adds right after."""
    srv = await start_servers()
    alice = await provision(srv.keys_address, tmp_path / "a", "alice")
    b1 = await provision(srv.keys_address, tmp_path / "b1", "bob")
    async with SecureClient(alice, srv.relay_address, srv.keys_address) as sender:
        assert set((await sender.send("bob", b"one")).devices) == {address(b1)}
        b2 = await provision(srv.keys_address, tmp_path / "b2", "bob")
        receipt = await sender.send("bob", b"two")
        assert set(receipt.devices) == {address(b1), address(b2)}
    async with SecureClient(b2, srv.relay_address, srv.keys_address) as reader:
        assert [m.body for m in await take(reader, 1)] == [b"two"]
