"""The delivery contract, end to end, against real gRPC servers on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.common.convert import address_to_pb
from relay.common.status import error_info
from relay.config import ApiKeyConfig
from relay.model import Address, registration_id
from relay.server.app import RelayApp
from relaypb.common.v1 import address_pb2
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.conftest import Servers, StartServers
from tests.support import Device, RawSession, connect, envelope, pub, register

pytestmark = pytest.mark.integration


async def test_two_devices_exchange_both_ways(servers: Servers, channel: grpc.aio.Channel) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    a = await connect(channel, alice)
    b = await connect(channel, bob)
    assert await a.until_queue_empty() == []
    assert await b.until_queue_empty() == []
    res = await a.send(envelope(bob.address, b"hi bob"))
    assert res[0].outcome == relay_pb2.OUTCOME_STORED and res[0].code == 0
    (got,) = await b.receive(1)
    assert got.content == b"hi bob"
    assert got.sender == address_to_pb(alice.address)
    assert got.server_timestamp_ms > 0
    await b.send(envelope(alice.address, b"hi alice"))
    (back,) = await a.receive(1)
    assert back.content == b"hi alice" and back.sender.user == "bob"
    await a.close()
    await b.close()


async def test_offline_device_gets_stored_in_order_then_marker_then_live(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    a = await connect(channel, alice, receive=False)
    for i in range(300):  # more than one delivery page
        await a.send(envelope(bob.address, b"%d" % i))
    b = await connect(channel, bob)
    stored = await b.until_queue_empty()
    assert [e.content for e in stored] == [b"%d" % i for i in range(300)]
    await a.send(envelope(bob.address, b"live"))
    (live,) = await b.receive(1)
    assert live.content == b"live"
    await a.close()
    await b.close()


async def test_acked_never_returns_unacked_does(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    a = await connect(channel, alice, receive=False)
    envs = [envelope(bob.address, b"m%d" % i) for i in range(4)]
    await a.send(*envs)
    b = await connect(channel, bob)
    got = await b.until_queue_empty()
    assert [e.content for e in got] == [b"m0", b"m1", b"m2", b"m3"]
    await b.ack(got[0].message_id, got[2].message_id)
    # A send after the ack on the same stream orders the ack before the reconnect.
    await b.send(envelope(alice.address, b"sync"))
    await b.close()
    b2 = await connect(channel, bob)
    again = await b2.until_queue_empty()
    assert [e.content for e in again] == [b"m1", b"m3"]
    await b2.close()
    await a.close()


async def test_duplicate_send_is_delivered_once(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    a = await connect(channel, alice, receive=False)
    mid = os.urandom(16)
    first = await a.send(envelope(bob.address, b"once", message_id=mid))
    second = await a.send(envelope(bob.address, b"once", message_id=mid))
    assert first[0].outcome == relay_pb2.OUTCOME_STORED
    assert second[0].outcome == relay_pb2.OUTCOME_DUPLICATE
    b = await connect(channel, bob)
    got = await b.until_queue_empty()
    assert [e.message_id for e in got] == [mid]
    await b.ack(mid)
    third = await a.send(envelope(bob.address, b"once", message_id=mid))
    assert third[0].outcome == relay_pb2.OUTCOME_DUPLICATE  # still, after the ack
    await a.close()
    await b.close()


async def test_second_session_displaces_first(servers: Servers, channel: grpc.aio.Channel) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    first = await connect(channel, bob)
    await first.until_queue_empty()
    second = await connect(channel, bob)
    assert second.ready.session_epoch > first.ready.session_epoch
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first.frame()
    assert info.value.code() == grpc.StatusCode.ABORTED
    detail = error_info(info.value)
    assert detail is not None and detail.reason == "SESSION_DISPLACED"
    assert detail.metadata["session_epoch"] == str(second.ready.session_epoch)
    await second.until_queue_empty()
    a = await connect(channel, alice, receive=False)
    await a.send(envelope(bob.address, b"to the new one"))
    (got,) = await second.receive(1)
    assert got.content == b"to the new one"
    # A send-only session of bob does not displace his receiving one.
    sender = await connect(channel, bob, receive=False)
    await a.send(envelope(bob.address, b"still here"))
    (got,) = await second.receive(1)
    assert got.content == b"still here"
    for s in (a, second, sender):
        await s.close()


async def test_limits_are_named(start_servers: StartServers) -> None:
    servers = await start_servers(
        **{"limits.max_envelope_bytes": 1000, "limits.max_queue_depth": 3}
    )
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    async with grpc.aio.insecure_channel(servers.relay_address) as channel:
        a = await connect(channel, alice, receive=False)
        (big,) = await a.send(envelope(bob.address, b"x" * 1001))
        assert big.outcome == relay_pb2.OUTCOME_REJECTED
        assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert big.limit == "max_envelope_bytes" and "1000" in big.message
        results = await a.send(*[envelope(bob.address, b"m") for _ in range(4)])
        assert [r.outcome for r in results] == [relay_pb2.OUTCOME_STORED] * 3 + [
            relay_pb2.OUTCOME_REJECTED
        ]
        assert results[3].limit == "max_queue_depth"
        assert results[3].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        b = await connect(channel, bob)
        assert len(await b.until_queue_empty()) == 3  # nothing silently dropped or added
        await a.close()
        await b.close()


async def test_send_without_api_keys_configured(servers: Servers) -> None:
    bob = await register(servers.keys_address, "bob")
    async with grpc.aio.insecure_channel(servers.relay_address) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Send(relay_pb2.SendRequest(envelopes=[envelope(bob.address, b"x")]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "api_keys" in (info.value.details() or "")


async def test_service_sender_with_api_key(
    tmp_path: os.PathLike[str], start_servers: StartServers
) -> None:

    key_file = os.path.join(tmp_path, "api.key")
    with open(key_file, "w") as f:
        f.write("s3cret-service-key-0123456789abcdef\n")
    servers = await start_servers(**{"limits.max_batch_envelopes": 2})
    # A second relay node on the same data, with an API key ([[api_keys]] in a config file).
    cfg = dataclasses.replace(
        servers.config, api_keys=(ApiKeyConfig("default", "billing", str(key_file)),)
    )
    bob = await register(servers.keys_address, "bob")
    async with RelayApp(cfg) as relay, grpc.aio.insecure_channel(relay.address) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)
        auth = (("authorization", "Bearer s3cret-service-key-0123456789abcdef"),)
        reply = await stub.Send(
            relay_pb2.SendRequest(envelopes=[envelope(bob.address, b"invoice")]), metadata=auth
        )
        assert [r.outcome for r in reply.results] == [relay_pb2.OUTCOME_STORED]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Send(
                relay_pb2.SendRequest(envelopes=[envelope(bob.address, b"x")] * 3), metadata=auth
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        detail = error_info(info.value)
        assert detail is not None and detail.metadata["limit"] == "max_batch_envelopes"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Send(relay_pb2.SendRequest(), metadata=(("authorization", "Bearer nope"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        b = await connect(channel, bob)
        (got,) = await b.until_queue_empty()
        assert got.content == b"invoice" and got.sender.user == "service:billing"
        assert got.sender.device == 0
        await b.close()


async def test_forged_or_missing_authentication(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    bob = await register(servers.keys_address, "bob")
    carol = await register(servers.keys_address, "carol")
    # carol claims to be bob: her signature does not verify with bob's key.
    impostor = type(bob)(bob.address, carol.signing_key)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await connect(channel, impostor)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "does not verify" in (info.value.details() or "")
    # A device nobody registered.
    ghost = type(bob)(Address("default", "ghost", 1), carol.signing_key)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await connect(channel, ghost)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Sending before authenticating.
    call = relay_pb2_grpc.RelayStub(channel).Connect()
    await call.write(relay_pb2.ClientFrame(send=relay_pb2.SendBatch(batch_id=1)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in (info.value.details() or "")
    # The stream ends before the auth frame.
    call = relay_pb2_grpc.RelayStub(channel).Connect()
    await call.write(
        relay_pb2.ClientFrame(hello=relay_pb2.Hello(address=address_to_pb(bob.address)))
    )
    await call.read()
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_nobody_reads_or_acks_another_devices_queue(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    carol = await register(servers.keys_address, "carol")
    a = await connect(channel, alice, receive=False)
    (res,) = await a.send(envelope(bob.address, b"for bob only"))
    c = await connect(channel, carol)
    assert await c.until_queue_empty() == []
    await c.ack(res.message_id)  # acking bob's message from carol's session: no effect
    await c.send(envelope(alice.address, b"sync"))
    b = await connect(channel, bob)
    got = await b.until_queue_empty()
    assert [e.content for e in got] == [b"for bob only"]
    for s in (a, b, c):
        await s.close()


async def test_ephemeral_only_online_never_stored(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    a = await connect(channel, alice, receive=False)
    (off,) = await a.send(envelope(bob.address, b"typing", ephemeral=True))
    assert off.outcome == relay_pb2.OUTCOME_RECIPIENT_OFFLINE
    b = await connect(channel, bob)
    assert await b.until_queue_empty() == []
    (on,) = await a.send(envelope(bob.address, b"typing", ephemeral=True))
    assert on.outcome == relay_pb2.OUTCOME_DELIVERED
    (got,) = await b.receive(1)
    assert got.content == b"typing" and got.ephemeral
    await b.close()
    b2 = await connect(channel, bob)
    assert await b2.until_queue_empty() == []
    await a.close()
    await b2.close()


async def test_fifo_per_pair_with_concurrent_senders(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    bob = await register(servers.keys_address, "bob")
    senders = [await register(servers.keys_address, f"s{i}") for i in range(5)]
    b = await connect(channel, bob)
    await b.until_queue_empty()
    sessions = [await connect(channel, s, receive=False) for s in senders]

    async def burst(i: int) -> None:
        for n in range(40):
            await sessions[i].send(envelope(bob.address, b"%d:%d" % (i, n)))

    await asyncio.gather(*(burst(i) for i in range(5)))
    got = await b.receive(200)
    for i in range(5):
        mine = [e.content for e in got if e.content.startswith(b"%d:" % i)]
        assert mine == [b"%d:%d" % (i, n) for n in range(40)]
    for s in [b, *sessions]:
        await s.close()


async def test_bad_recipients_and_ids_are_rejected_not_fatal(
    servers: Servers, channel: grpc.aio.Channel
) -> None:
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    a = await connect(channel, alice, receive=False)
    results = await a.send(
        envelope(bob.address, b"ok"),
        envelope(bob.address, b"short id", message_id=b"123"),
        envelope(Address("default", "nobody", 1), b"?"),
        envelope(Address("other-tenant", "bob", 1), b"?"),
        envelope(Address("default", "bob", 0), b"?"),
    )
    codes = [r.code for r in results]
    assert codes == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert "message_id" in results[1].message
    assert "envelopes[4].recipient.device" in results[4].message
    await a.close()


async def test_health_and_reflection(servers: Servers, channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="relaypb.relay.v1.Relay"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    resp = await call.read()
    names = {s.name for s in resp.list_services_response.service}
    assert "relaypb.relay.v1.Relay" in names
    call.cancel()


@pytest.fixture
async def alice(servers: Servers) -> Device:
    return await register(servers.keys_address, "alice")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    message_id=st.binary(max_size=40),
    tenant=st.text(max_size=70),
    user=st.text(max_size=140),
    device=st.integers(0, 2**32 - 1),
    content=st.binary(max_size=2048),
    ttl=st.integers(0, 2**32 - 1),
)
async def test_any_send_input_gets_a_clean_answer(
    channel: grpc.aio.Channel,
    alice: Device,
    message_id: bytes,
    tenant: str,
    user: str,
    device: int,
    content: bytes,
    ttl: int,
) -> None:
    a = await connect(channel, alice, receive=False)
    env = relay_pb2.Envelope(
        message_id=message_id,
        recipient=address_pb2.Address(tenant=tenant, user=user, device=device),
        content=content,
        ttl_seconds=ttl,
    )
    (res,) = await a.send(env)
    assert res.outcome == relay_pb2.OUTCOME_REJECTED  # no such recipient is registered
    assert res.code in {3, 5, 7} and res.message
    await a.close()


async def _send_batch(
    session: RawSession, envs: list[relay_pb2.Envelope], users: list[relay_pb2.UserRef]
) -> relay_pb2.SendResults:
    """One SendBatch with ``complete_device_lists`` on a raw session."""
    session._batch += 1
    fut: asyncio.Future[relay_pb2.SendResults] = asyncio.get_running_loop().create_future()
    session.results[session._batch] = fut
    await session.call.write(
        relay_pb2.ClientFrame(
            send=relay_pb2.SendBatch(
                batch_id=session._batch, envelopes=envs, complete_device_lists=users
            )
        )
    )
    return await asyncio.wait_for(fut, 30)


async def test_device_lists_of_another_tenant_refuse_the_whole_request(
    tmp_path: os.PathLike[str], start_servers: StartServers
) -> None:
    key_file = os.path.join(tmp_path, "api.key")
    with open(key_file, "w") as f:
        f.write("s3cret-service-key-0123456789abcdef\n")
    servers = await start_servers(**{"limits.max_batch_envelopes": 2})
    cfg = dataclasses.replace(
        servers.config, api_keys=(ApiKeyConfig("default", "billing", str(key_file)),)
    )
    alice = await register(servers.keys_address, "alice")
    bob = await register(servers.keys_address, "bob")
    bob_ref = relay_pb2.UserRef(tenant="default", user="bob")
    elsewhere = relay_pb2.UserRef(tenant="other", user="bob")
    async with RelayApp(cfg) as relay, grpc.aio.insecure_channel(relay.address) as channel:
        a = await connect(channel, alice, receive=False)
        reply = await _send_batch(a, [envelope(bob.address, b"x")], [bob_ref, elsewhere])
        [result] = reply.results
        assert result.outcome == relay_pb2.OUTCOME_REJECTED
        assert result.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "complete_device_lists[1].tenant is 'other'" in result.message
        # Over the batch limit by its entries: refused as a whole, named.
        over = await _send_batch(a, [envelope(bob.address, b"y")], [bob_ref] * 3)
        assert over.results[0].limit == "max_batch_envelopes"
        assert "3 complete_device_lists entries" in over.results[0].message
        # The stream goes on, and nothing was stored by the refused batches.
        reg = registration_id(pub(bob.signing_key))
        fine = envelope(bob.address, b"fine", recipient_registration_id=reg)
        ok = await _send_batch(a, [fine], [bob_ref])
        assert [r.outcome for r in ok.results] == [relay_pb2.OUTCOME_STORED]
        # A service sender may only name its own tenant too.
        stub = relay_pb2_grpc.RelayStub(channel)
        auth = (("authorization", "Bearer s3cret-service-key-0123456789abcdef"),)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Send(
                relay_pb2.SendRequest(
                    envelopes=[envelope(bob.address, b"z")], complete_device_lists=[elsewhere]
                ),
                metadata=auth,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may only send within tenant 'default'" in (info.value.details() or "")
        b = await connect(channel, bob)
        assert [e.content for e in await b.until_queue_empty()] == [b"fine"]
        await a.close()
        await b.close()
