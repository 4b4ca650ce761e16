"""RelayClient against the real relay node and key directory (in-process, port 0)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.errors import LimitExceeded, SessionDisplaced, Unauthenticated, Unavailable
from relay.model import Address, Outcome
from relay.sdk import DeviceState, OutgoingMessage, ReceivedMessage, RelayClient
from relay.sdk.keys import Identity
from tests.conftest import Servers, StartServers
from tests.sdk.helpers import Proxy, RecordingBackoff, provision

pytestmark = pytest.mark.integration

TIMEOUT = 30


async def next_message(messages: AsyncIterator[ReceivedMessage]) -> ReceivedMessage:
    async with asyncio.timeout(TIMEOUT):
        return await anext(messages)


async def test_two_devices_exchange_both_ways(servers: Servers, tmp_path: Path) -> None:
    alice = await provision(servers.keys_address, tmp_path / "alice", "alice")
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    with (
        DeviceState.open(tmp_path / "alice") as a_state,
        DeviceState.open(tmp_path / "bob") as b_state,
    ):
        async with (
            RelayClient(a_state, servers.relay_address) as a,
            RelayClient(b_state, servers.relay_address) as b,
        ):
            assert (a.address, b.address) == (alice, bob)
            receipt = await a.send(bob, b"hi bob")
            # bob is online: DELIVERED if his SDK acked within limits.direct_ack_ms
            assert receipt.outcome in (Outcome.STORED, Outcome.DELIVERED)
            assert receipt.recipient == bob
            got = await next_message(b.messages())
            assert (got.sender, got.message_id, got.content) == (
                alice,
                receipt.message_id,
                b"hi bob",
            )
            assert got.server_timestamp_ms > 0
            await b.ack(got)
            await b.send(alice, b"hi alice")
            back = await next_message(a.messages())
            assert (back.sender, back.content) == (bob, b"hi alice")


async def test_send_many_batches_in_order(servers: Servers, tmp_path: Path) -> None:
    await provision(servers.keys_address, tmp_path / "alice", "alice")
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    with (
        DeviceState.open(tmp_path / "alice") as a_state,
        DeviceState.open(tmp_path / "bob") as b_state,
    ):
        async with RelayClient(a_state, servers.relay_address, receive=False, batch_size=2) as a:
            receipts = await a.send_many(OutgoingMessage(bob, b"%d" % i) for i in range(5))
            assert [r.outcome for r in receipts] == [Outcome.STORED] * 5
            assert len({r.message_id for r in receipts}) == 5
        async with RelayClient(b_state, servers.relay_address) as b:
            await b.wait_queue_empty()
            # Everything stored before the session is in the local inbox at the marker.
            assert [e.message.content for e in b_state.inbox()] == [b"%d" % i for i in range(5)]
            messages = b.messages()
            assert [(await next_message(messages)).content for _ in range(5)] == [
                b"%d" % i for i in range(5)
            ]


async def test_send_retried_after_reconnect_is_delivered_once(
    servers: Servers, tmp_path: Path
) -> None:
    alice = await provision(servers.keys_address, tmp_path / "alice", "alice")
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    backoff = RecordingBackoff()
    with (
        DeviceState.open(tmp_path / "alice") as a_state,
        DeviceState.open(tmp_path / "bob") as b_state,
    ):
        async with (
            Proxy(servers.relay_address) as proxy,
            RelayClient(a_state, proxy.address, receive=False, backoff=backoff) as a,
            RelayClient(b_state, servers.relay_address) as b,
        ):
            messages = b.messages()
            proxy.drop_down = True  # the relay's SendResults frame will be lost
            message_id = bytes(range(16))
            sending = asyncio.create_task(a.send(bob, b"once", message_id=message_id))
            got = await next_message(messages)
            assert (got.sender, got.message_id, got.content) == (alice, message_id, b"once")
            assert not sending.done()
            proxy.drop_down = False
            proxy.cut()
            async with asyncio.timeout(TIMEOUT):
                receipt = await sending
            # Resent on the new session with the same id: the relay knew it already.
            assert receipt.outcome is Outcome.DUPLICATE and receipt.message_id == message_id
            assert backoff.attempts == [1] and proxy.connections == 2
            await a.send(bob, b"after")
            assert (await next_message(messages)).content == b"after"
            assert b.duplicates_dropped == 0


async def test_redelivery_after_reconnect_is_yielded_once(servers: Servers, tmp_path: Path) -> None:
    await provision(servers.keys_address, tmp_path / "alice", "alice")
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    backoff = RecordingBackoff()
    with (
        DeviceState.open(tmp_path / "alice") as a_state,
        DeviceState.open(tmp_path / "bob") as b_state,
    ):
        async with (
            Proxy(servers.relay_address) as proxy,
            RelayClient(a_state, servers.relay_address, receive=False) as a,
            RelayClient(b_state, proxy.address, backoff=backoff) as b,
        ):
            messages = b.messages()
            await b.wait_queue_empty()
            proxy.drop_up = True  # bob's ack will not reach the relay
            await a.send(bob, b"first")
            first = await next_message(messages)
            assert first.content == b"first"
            proxy.drop_up = False
            proxy.cut()
            await backoff.called.wait()
            await b.wait_queue_empty()  # the new session: "first" came again, unacked
            assert b.duplicates_dropped == 1
            await a.send(bob, b"second")
            assert (await next_message(messages)).content == b"second"


async def test_dedup_survives_client_restart(servers: Servers, tmp_path: Path) -> None:
    await provision(servers.keys_address, tmp_path / "alice", "alice")
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    with DeviceState.open(tmp_path / "alice") as a_state:
        async with RelayClient(a_state, servers.relay_address, receive=False) as a:
            with DeviceState.open(tmp_path / "bob") as b_state:
                async with (
                    Proxy(servers.relay_address) as proxy,
                    RelayClient(b_state, proxy.address) as b,
                ):
                    await b.wait_queue_empty()
                    proxy.drop_up = True  # the relay never hears bob's ack
                    await a.send(bob, b"one")
                    await a.send(bob, b"two")
                    messages = b.messages()
                    one = await next_message(messages)
                    two = await next_message(messages)  # acks "one" locally
                    assert (one.content, two.content) == (b"one", b"two")
            # "two" was taken but never acknowledged: a restart yields it again,
            # and the relay's redelivery of both is dropped as duplicates.
            with DeviceState.open(tmp_path / "bob") as b_state:
                async with RelayClient(b_state, servers.relay_address) as b:
                    await b.wait_queue_empty()
                    assert b.duplicates_dropped == 2
                    messages = b.messages()
                    again = await next_message(messages)
                    assert (again.message_id, again.content) == (two.message_id, b"two")
                    await a.send(bob, b"three")
                    assert (await next_message(messages)).content == b"three"


async def test_displaced_session_is_not_reconnected(servers: Servers, tmp_path: Path) -> None:
    await provision(servers.keys_address, tmp_path / "bob", "bob")
    backoff = RecordingBackoff()
    with DeviceState.open(tmp_path / "bob") as state:
        async with RelayClient(state, servers.relay_address, backoff=backoff) as first:
            messages = first.messages()
            async with RelayClient(state, servers.relay_address, receive=False) as sender_only:
                await sender_only.send(first.address, b"to myself")
                assert (await next_message(messages)).content == b"to myself"
            async with RelayClient(state, servers.relay_address) as second:
                with pytest.raises(SessionDisplaced):
                    await next_message(messages)
                assert isinstance(first.error, SessionDisplaced)
                # final because the relay names the newer session that took over
                assert first.error.metadata["session_epoch"] == str(second.session_epoch)
                assert second.session_epoch > first.session_epoch
                with pytest.raises(SessionDisplaced):
                    await first.send(first.address, b"x")
                await second.wait_queue_empty()
            assert backoff.attempts == []


async def test_wrong_identity_is_unauthenticated(servers: Servers, tmp_path: Path) -> None:
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    backoff = RecordingBackoff()
    with DeviceState.open(tmp_path / "mallory") as state:
        state.save_identity(Identity.generate())
        state.save_address(bob)
        client = RelayClient(state, servers.relay_address, backoff=backoff)
        with pytest.raises(Unauthenticated):
            async with asyncio.timeout(TIMEOUT):
                await client.__aenter__()
        assert backoff.attempts == []


async def test_rejected_send_names_the_limit(start_servers: StartServers, tmp_path: Path) -> None:
    servers = await start_servers(**{"limits.max_envelope_bytes": 64})
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    with DeviceState.open(tmp_path / "bob") as state:
        async with RelayClient(state, servers.relay_address, receive=False) as client:
            with pytest.raises(LimitExceeded) as info:
                await client.send(bob, b"x" * 1000)
            assert info.value.limit == "max_envelope_bytes"
            [ok, rejected] = await client.send_many(
                [OutgoingMessage(bob, b"small"), OutgoingMessage(bob, b"x" * 1000)]
            )
            assert ok.ok and ok.outcome is Outcome.STORED
            assert rejected.outcome is Outcome.REJECTED
            assert isinstance(rejected.error, LimitExceeded)


async def test_unreachable_relay_gives_up_after_the_backoff(
    servers: Servers, tmp_path: Path
) -> None:
    await provision(servers.keys_address, tmp_path / "bob", "bob")
    async with Proxy(servers.relay_address) as proxy:
        dead = proxy.address
    backoff = RecordingBackoff(give_up_after=2)
    with DeviceState.open(tmp_path / "bob") as state, pytest.raises(Unavailable, match=dead):
        async with asyncio.timeout(TIMEOUT), RelayClient(state, dead, backoff=backoff):
            pass
    assert backoff.attempts == [1, 2, 3]


async def test_send_only_client_cannot_receive(servers: Servers, tmp_path: Path) -> None:
    await provision(servers.keys_address, tmp_path / "bob", "bob")
    with DeviceState.open(tmp_path / "bob") as state:
        async with RelayClient(state, servers.relay_address, receive=False) as client:
            with pytest.raises(RuntimeError, match="send-only"):
                await client.wait_queue_empty()
            with pytest.raises(RuntimeError, match="send-only"):
                await anext(client.messages())


async def test_unregistered_state_is_refused(tmp_path: Path) -> None:
    with DeviceState.open(tmp_path) as state, pytest.raises(RuntimeError, match="no registered"):
        RelayClient(state, "127.0.0.1:1")


class TaggingCodec:
    """Seals by prefixing a tag; counts calls (a stand-in for a real cipher)."""

    def __init__(self) -> None:
        self.sealed = 0
        self.opened = 0

    def seal(self, recipient: Address, plaintext: bytes) -> bytes:
        self.sealed += 1
        return b"sealed-for-" + recipient.user.encode() + b":" + plaintext

    async def prepare(self, messages: object) -> None:
        pass

    def open(self, sender: Address, content: bytes) -> bytes:
        self.opened += 1
        prefix, _, plaintext = content.partition(b":")
        assert prefix == b"sealed-for-bob"
        return plaintext


async def test_codec_seals_and_opens_each_message_once(servers: Servers, tmp_path: Path) -> None:
    await provision(servers.keys_address, tmp_path / "alice", "alice")
    bob = await provision(servers.keys_address, tmp_path / "bob", "bob")
    a_codec, b_codec = TaggingCodec(), TaggingCodec()
    with (
        DeviceState.open(tmp_path / "alice") as a_state,
        DeviceState.open(tmp_path / "bob") as b_state,
    ):
        async with (
            Proxy(servers.relay_address) as proxy,
            RelayClient(a_state, proxy.address, receive=False, codec=a_codec) as a,
        ):
            proxy.drop_down = True
            sending = asyncio.create_task(a.send(bob, b"secret"))
            async with RelayClient(b_state, servers.relay_address) as plain:
                raw = await next_message(plain.messages())
                assert raw.content == b"sealed-for-bob:secret"  # what the relay carried
                await plain.ack(raw)
            proxy.drop_down = False
            proxy.cut()
            async with asyncio.timeout(TIMEOUT):
                assert (await sending).outcome is Outcome.DUPLICATE
            assert a_codec.sealed == 1  # the retry reused the sealed bytes
            await a.send(bob, b"second")
        async with RelayClient(b_state, servers.relay_address, codec=b_codec) as b:
            got = await next_message(b.messages())
            assert got.content == b"second" and b_codec.opened == 1
