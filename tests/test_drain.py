"""Graceful drain of a relay node (relay.server.drain), in-process on real gRPC servers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay.common.status import error_info
from relay.config import relay_key_path
from relay.errors import Draining
from relay.model import Address
from relay.sdk import DeviceState, RelayClient
from relay.server.app import SERVICE_NAME, RelayApp
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.conftest import Servers, StartServers
from tests.sdk.helpers import RecordingBackoff, provision
from tests.support import RawSession, connect, envelope, register

pytestmark = pytest.mark.integration

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(reply.status)


async def ended_with(session: RawSession) -> grpc.aio.AioRpcError:
    """The status a Connect stream ended with (it must end with an error)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            await session.frame(timeout=10)  # raises what the stream ended with
    return info.value


def assert_draining(exc: grpc.aio.AioRpcError, node_id: str) -> None:
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    detail = error_info(exc)
    assert detail is not None, exc
    assert detail.reason == Draining.reason == "NODE_DRAINING"
    assert detail.metadata["node_id"] == node_id
    assert "reconnect to another relay node" in (exc.details() or "")


async def test_drain_ends_every_session_and_refuses_new_ones(servers: Servers) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    node_id = servers.config.node.id
    async with grpc.aio.insecure_channel(servers.relay_address) as channel:
        receiving = await connect(channel, bob)
        await receiving.until_queue_empty()
        sending = await connect(channel, alice, receive=False)
        (ok,) = await sending.send(envelope(bob.address, b"before"))
        assert ok.outcome in (relay_pb2.OUTCOME_STORED, relay_pb2.OUTCOME_DELIVERED)
        assert await health(servers.relay_address) == SERVING

        await servers.relay.drain(0)

        assert_draining(await ended_with(receiving), node_id)
        assert_draining(await ended_with(sending), node_id)
        # A new session is refused with the same error, before any handshake.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await connect(channel, alice)
        assert_draining(refused.value, node_id)
        for service in ("", SERVICE_NAME):
            assert await health(servers.relay_address, service) == NOT_SERVING
    assert servers.relay.relay is not None
    assert len(servers.relay.relay.sessions) == 0


async def test_a_stream_mid_handshake_when_the_drain_begins_is_ended_too(
    servers: Servers,
) -> None:
    """No session opened in the window between the sweep and the refusal survives it."""
    from relay import authproof
    from relay.common.convert import address_to_pb

    bob = await register(servers.keys_address, "bob")
    async with grpc.aio.insecure_channel(servers.relay_address) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Connect()
        hello = relay_pb2.Hello(address=address_to_pb(bob.address), receive=True)
        await call.write(relay_pb2.ClientFrame(hello=hello))
        challenge = (await call.read()).challenge
        await servers.relay.drain(0)  # the stream is past the refusal, before its session
        transcript = authproof.connect_transcript(
            challenge.nonce, challenge.node_id, challenge.server_time_ms, bob.address
        )
        await call.write(
            relay_pb2.ClientFrame(
                auth=relay_pb2.AuthResponse(signature=bob.signing_key.sign(transcript))
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(10):
                while True:
                    frame = await call.read()
                    assert frame is not grpc.aio.EOF, "the stream ended without a status"
        assert_draining(info.value, servers.config.node.id)
    assert servers.relay.relay is not None
    assert len(servers.relay.relay.sessions) == 0, "a session outlived the drain"


async def test_during_the_drain_delay_health_says_not_serving_and_sessions_go_on(
    servers: Servers,
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    hurry = asyncio.Event()
    async with grpc.aio.insecure_channel(servers.relay_address) as channel:
        receiving = await connect(channel, bob)
        await receiving.until_queue_empty()
        drain = asyncio.create_task(servers.relay.drain(600, hurry))
        # Watch (not poll) the health status until it flips.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async with asyncio.timeout(10):
            async for reply in watch:
                if reply.status == NOT_SERVING:
                    break
        watch.cancel()
        # Still serving: a new session, a send and its delivery.
        sending = await connect(channel, alice, receive=False)
        (ok,) = await sending.send(envelope(bob.address, b"during the delay"))
        assert ok.outcome in (relay_pb2.OUTCOME_STORED, relay_pb2.OUTCOME_DELIVERED)
        (got,) = await receiving.receive(1)
        assert got.content == b"during the delay"
        assert not drain.done()
        hurry.set()  # a second signal: the delay is cut short
        async with asyncio.timeout(10):
            await drain
        assert_draining(await ended_with(receiving), servers.config.node.id)
        assert_draining(await ended_with(sending), servers.config.node.id)


@pytest.fixture
async def two_nodes(
    start_servers: StartServers, tmp_path: Path
) -> AsyncIterator[tuple[Servers, RelayApp]]:
    """The key directory and node relay-1 of ``start_servers``, plus node relay-2."""
    first = await start_servers()
    config = dataclasses.replace(
        first.config,
        node=dataclasses.replace(first.config.node, id="relay-2"),
        storage=dataclasses.replace(first.config.storage, data_dir=str(tmp_path / "second")),
        keyserver=dataclasses.replace(
            first.config.keyserver, relay_key_file=str(relay_key_path(first.config))
        ),
    )
    async with AsyncExitStack() as stack:
        second = await stack.enter_async_context(RelayApp(config))
        yield first, second


async def test_the_sdk_moves_to_another_node_at_once_without_backoff(
    two_nodes: tuple[Servers, RelayApp], tmp_path: Path
) -> None:
    first, second = two_nodes
    me = await provision(first.keys_address, tmp_path / "me", "me")
    peer: Address = await provision(first.keys_address, tmp_path / "peer", "peer")
    backoff = RecordingBackoff()
    with DeviceState.open(tmp_path / "me") as state:
        async with RelayClient(
            state, [first.relay_address, second.address], backoff=backoff
        ) as client:
            assert client.address == me
            assert client.node_id == "relay-1"
            started = time.monotonic()
            await first.relay.drain(0)
            # The send waits for the next session: it is answered by relay-2.
            receipt = await asyncio.wait_for(client.send(peer, b"after the drain"), 10)
            took = time.monotonic() - started
            assert receipt.error is None
            assert client.node_id == "relay-2"
            assert backoff.attempts == [], "a drain must not be answered with backoff"
            assert took < 2.0, f"reconnecting took {took:.2f} s"
            assert client.error is None
