"""A real KeyserverApp on 127.0.0.1 port 0, called over a real grpc.aio channel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyserver.app import KeyserverApp
from keyserver.client import FETCH_PREKEY_BUNDLES_METHOD, SERVICE_NAME, bearer_metadata
from relay import authproof
from relay.clock import FakeClock
from relay.common.convert import address_from_pb, address_to_pb, device_list_from_pb
from relay.common.status import error_info
from relay.config import ConfigError
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from relaypb.keys.v1 import keys_pb2_grpc
from tests.keyserver.keys import (
    Account,
    DeviceKeys,
    one_time_pb,
    one_time_prekeys,
    registration_pb,
)
from tests.keyserver.wire import (
    config,
    count,
    device_list,
    fetch,
    identity_key,
    link,
    list_devices,
    publish,
    register,
    relay_key,
    serve,
    sign,
)

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub

pytestmark = pytest.mark.integration


async def test_the_key_directory_end_to_end(
    stub: KeyDirectoryAsyncStub, clock: FakeClock, tmp_path: Path
) -> None:
    phone, laptop, account = DeviceKeys(), DeviceKeys(), Account()
    phone_at = clock.now_ms()
    one = await register(stub, phone, one_time=[1], account=account)
    two = await link(stub, clock, account, phone, one, laptop)
    laptop_at = clock.now_ms()
    assert (one, two) == (Address("acme", "alice", 1), Address("acme", "alice", 2))

    rotated = laptop.signed_prekey(key_id=2)
    request = pb.PublishPrekeysRequest(
        device=address_to_pb(two),
        signed_prekey=pb.SignedPrekey(
            key_id=2, public_key=rotated.public_key, signature=rotated.signature
        ),
        one_time_prekeys=one_time_pb(one_time_prekeys([10, 11])),
    )
    assert await publish(stub, clock, laptop, two, request) == 2
    assert await count(stub, clock, laptop, two) == 2
    assert await count(stub, clock, phone, one) == 1

    bundles = await fetch(stub, clock, phone, one)
    assert [address_from_pb(b.address) for b in bundles] == [one, two]
    assert [b.one_time_prekey.key_id for b in bundles] == [1, 10]
    assert bundles[1].signed_prekey.public_key == rotated.public_key
    assert bundles[0].identity_key == phone.identity_key
    assert bundles[0].identity_dh_key == phone.identity_dh_key
    assert authproof.verify(
        bundles[0].identity_key,
        bundles[0].identity_dh_signature,
        authproof.identity_dh_transcript(bundles[0].identity_dh_key),
    )
    # The phone's only one-time key is gone: its next bundle has none.
    again = await fetch(stub, clock, laptop, two)
    assert not again[0].HasField("one_time_prekey")
    assert again[0].HasField("signed_prekey")
    assert again[1].one_time_prekey.key_id == 11
    assert await count(stub, clock, phone, one) == 0

    listed = await list_devices(stub, clock, laptop, two)
    assert [address_from_pb(d.address) for d in listed] == [one, two]
    assert [d.identity_key for d in listed] == [phone.identity_key, laptop.identity_key]
    assert [d.registered_at_ms for d in listed] == [phone_at, laptop_at]

    assert await identity_key(stub, clock, phone, one, two) == laptop.identity_key
    # The relay nodes read with their bearer key instead of a signature.
    relay = bearer_metadata(relay_key(tmp_path))
    reply = await stub.GetIdentityKey(
        pb.GetIdentityKeyRequest(device=address_to_pb(two)), metadata=relay
    )
    assert reply.identity_key == laptop.identity_key
    stored = (
        await stub.GetDeviceList(
            pb.GetDeviceListRequest(tenant="acme", user="alice"), metadata=relay
        )
    ).device_list
    assert stored == await device_list(stub, clock, phone, one)
    assert (stored.version, [d.device for d in stored.devices]) == (2, [1, 2])
    assert [d.identity_key for d in stored.devices] == [phone.identity_key, laptop.identity_key]
    assert stored.account_key == account.public_key
    assert device_list_from_pb(stored).verifies()


async def test_bad_input_is_invalid_argument_with_error_info(stub: KeyDirectoryAsyncStub) -> None:
    request = registration_pb(DeviceKeys().registration())
    request.signed_prekey.signature = DeviceKeys().sign(b"something else")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RegisterDevice(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "signed_prekey.signature does not verify with identity_key"
    info = error_info(raised.value)
    assert info is not None
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "e2ee-relay")


async def test_limits_and_missing_things_get_their_status(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    too_many = registration_pb(DeviceKeys().registration(one_time=range(101)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RegisterDevice(too_many)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(raised.value)
    assert info is not None
    assert dict(info.metadata) == {"limit": "max_one_time_prekeys_per_request", "value": "100"}

    keys = DeviceKeys()
    reader = await register(stub, keys)
    nobody = Address("acme", "nobody", 1)
    for call in (
        fetch(stub, clock, keys, reader, user="nobody"),
        identity_key(stub, clock, keys, reader, nobody),
        device_list(stub, clock, keys, reader, user="nobody"),
        identity_key(stub, clock, keys, reader, Address("acme", "alice", 2)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_fetches_never_hand_out_a_key_twice(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with serve(tmp_path, clock, **{"keyserver.max_bundle_fetches_per_target": 60}) as stub:
        keys, reader_keys = DeviceKeys(), DeviceKeys()
        await register(stub, keys, user="bob", one_time=range(20))
        reader = await register(stub, reader_keys, user="carol")
        request = pb.FetchPrekeyBundlesRequest(tenant="acme", user="bob")
        # Each fetch signed at its own time (a signed request is accepted once).
        signed = [
            sign(clock, reader_keys, reader, FETCH_PREKEY_BUNDLES_METHOD, request)
            for _ in range(60)
        ]
        replies = await asyncio.gather(
            *(stub.FetchPrekeyBundles(request, metadata=md) for md in signed)
        )
    bundles = [r.bundles[0] for r in replies]
    handed = [b.one_time_prekey.key_id for b in bundles if b.HasField("one_time_prekey")]
    assert sorted(handed) == list(range(20))
    assert (
        len({b.one_time_prekey.public_key for b in bundles if b.HasField("one_time_prekey")}) == 20
    )
    assert all(b.HasField("signed_prekey") for b in bundles)


async def test_bundle_fetches_are_rate_limited_as_configured(
    tmp_path: Path, clock: FakeClock
) -> None:
    limits = {
        "keyserver.max_bundle_fetches_per_target": 2,
        "keyserver.max_bundle_fetches_per_requester": 3,
    }
    async with serve(tmp_path, clock, **limits) as stub:
        keys, reader_keys = DeviceKeys(), DeviceKeys()
        device = await register(stub, keys, user="bob", one_time=range(10))
        reader = await register(stub, reader_keys, user="carol")
        for _ in range(2):
            await fetch(stub, clock, reader_keys, reader, user="bob")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fetch(stub, clock, reader_keys, reader, user="bob")
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(raised.value)
        assert info is not None
        assert dict(info.metadata) == {"limit": "max_bundle_fetches_per_target", "value": "2"}
        await fetch(stub, clock, keys, device, user="carol")  # another requester: apart
        await fetch(stub, clock, reader_keys, reader, user="carol")  # the requester's third
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fetch(stub, clock, reader_keys, reader, user="carol")
        info = error_info(raised.value)
        assert info is not None
        assert dict(info.metadata) == {"limit": "max_bundle_fetches_per_requester", "value": "3"}
        assert await count(stub, clock, keys, device) == 8  # refused fetches claim nothing


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_devices_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    keys = DeviceKeys()
    async with (
        KeyserverApp(config(tmp_path), clock) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        await register(keys_pb2_grpc.KeyDirectoryStub(channel), keys, one_time=[1, 2])
    async with (
        KeyserverApp(config(tmp_path), clock) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        device = Address("acme", "alice", 1)
        listed = await list_devices(stub, clock, keys, device)
        assert [d.identity_key for d in listed] == [keys.identity_key]
        assert await count(stub, clock, keys, device) == 2
        # The account survives too: the user exists, with its signed list.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, DeviceKeys())
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        stored = await device_list(stub, clock, keys, device)
        assert [d.identity_key for d in stored.devices] == [keys.identity_key]


def test_unknown_storage_backend_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage\.backend: 'mysql' is unknown"):
        KeyserverApp(config(tmp_path, **{"storage.backend": "mysql"}))


def test_app_is_not_running_before_entry(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not running"):
        _ = KeyserverApp(config(tmp_path)).port


_bytes = st.one_of(st.binary(max_size=80), st.sampled_from([b"", bytes(32), bytes(64)]))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    tenant=st.one_of(st.just("acme"), st.text(max_size=70)),
    user=st.one_of(st.just("alice"), st.text(max_size=140)),
    identity_key=_bytes,
    identity_dh_key=_bytes,
    signature=_bytes,
    proof=_bytes,
    key_ids=st.lists(st.integers(0, 2**32 - 1), max_size=5),
    with_signed_prekey=st.booleans(),
)
async def test_random_registrations_get_a_clean_invalid_argument(
    stub: KeyDirectoryAsyncStub,
    tenant: str,
    user: str,
    identity_key: bytes,
    identity_dh_key: bytes,
    signature: bytes,
    proof: bytes,
    key_ids: list[int],
    with_signed_prekey: bool,
) -> None:
    request = pb.RegisterDeviceRequest(
        tenant=tenant,
        user=user,
        identity_key=identity_key,
        identity_dh_key=identity_dh_key,
        identity_dh_signature=signature,
        one_time_prekeys=[pb.OneTimePrekey(key_id=k, public_key=bytes(32)) for k in key_ids],
        proof=proof,
    )
    if with_signed_prekey:
        request.signed_prekey.CopyFrom(
            pb.SignedPrekey(key_id=1, public_key=identity_dh_key, signature=signature)
        )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RegisterDevice(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == "INVALID_ARGUMENT"
