"""PQ prekeys, prekey status and registration ids over a real gRPC key directory."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from keyserver.app import KeyserverApp
from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    FETCH_PREKEY_BUNDLES_METHOD,
    PUBLISH_PREKEYS_METHOD,
    sign_request_metadata,
)
from relay.clock import FakeClock
from relay.common.convert import address_from_pb, address_to_pb
from relay.model import Address, registration_id
from relaypb.keys.v1 import keys_pb2 as pb
from relaypb.keys.v1 import keys_pb2_grpc
from tests.keyserver.keys import DeviceKeys, one_time_pb, one_time_prekeys, pq_pb, registration_pb
from tests.keyserver.wire import config, fetch, list_devices, register, serve, sign

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub

pytestmark = pytest.mark.integration


async def _publish(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    request: pb.PublishPrekeysRequest,
) -> pb.PublishPrekeysResponse:
    md = sign_request_metadata(PUBLISH_PREKEYS_METHOD, device, keys.signing, request, clock)
    clock.advance(1)
    response: pb.PublishPrekeysResponse = await stub.PublishPrekeys(request, metadata=md)
    return response


async def _status(
    stub: KeyDirectoryAsyncStub, clock: FakeClock, keys: DeviceKeys, device: Address
) -> pb.CountOneTimePrekeysResponse:
    request = pb.CountOneTimePrekeysRequest(device=address_to_pb(device))
    md = sign_request_metadata(COUNT_ONE_TIME_PREKEYS_METHOD, device, keys.signing, request, clock)
    clock.advance(1)
    response: pb.CountOneTimePrekeysResponse = await stub.CountOneTimePrekeys(request, metadata=md)
    return response


async def test_pq_prekeys_end_to_end(stub: KeyDirectoryAsyncStub, clock: FakeClock) -> None:
    keys = DeviceKeys()
    reg = keys.registration(one_time=[1], one_time_pq=[2, 3])
    reply = await stub.RegisterDevice(registration_pb(reg))
    device = address_from_pb(reply.address)
    assert reply.registration_id == registration_id(keys.identity_key)

    status = (await _status(stub, clock, keys, device)).status
    assert (status.one_time_prekeys, status.one_time_pq_prekeys) == (1, 2)
    assert (status.low_water_mark, status.replenish, status.has_last_resort_pq_prekey) == (
        10,
        True,
        True,
    )
    new_last_resort = keys.pq_prekey(key_id=50)
    request = pb.PublishPrekeysRequest(
        device=address_to_pb(device),
        one_time_prekeys=one_time_pb(one_time_prekeys([4, 5])),
        one_time_pq_prekeys=[pq_pb(k) for k in keys.pq_prekeys([6])],
        last_resort_pq_prekey=pq_pb(new_last_resort),
    )
    published = await _publish(stub, clock, keys, device, request)
    assert published.one_time_prekeys_remaining == 3
    assert (published.status.one_time_prekeys, published.status.one_time_pq_prekeys) == (3, 3)

    bundles = [(await fetch(stub, clock, keys, device))[0] for _ in range(4)]
    assert [b.pq_prekey.key_id for b in bundles] == [2, 3, 6, 50]
    assert [b.pq_prekey_last_resort for b in bundles] == [False, False, False, True]
    assert bundles[3].pq_prekey.public_key == new_last_resort.public_key
    assert bundles[3].pq_prekey.signature == new_last_resort.signature
    assert {b.registration_id for b in bundles} == {reply.registration_id}
    listed = await list_devices(stub, clock, keys, device)
    assert [d.registration_id for d in listed] == [reply.registration_id]
    counted = await _status(stub, clock, keys, device)
    assert counted.count == counted.status.one_time_prekeys == 0
    assert counted.status.one_time_pq_prekeys == 0


async def test_bad_pq_signatures_are_invalid_argument_naming_the_key(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    keys = DeviceKeys()
    reg = keys.registration(one_time_pq=[15, 16, 17])
    forged = replace(reg.one_time_pq_prekeys[2], signature=reg.one_time_pq_prekeys[0].signature)
    bad = registration_pb(replace(reg, one_time_pq_prekeys=(*reg.one_time_pq_prekeys[:2], forged)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RegisterDevice(bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "one_time_pq_prekeys[2] (key_id 17): signature does not verify with identity_key"
    )
    missing = registration_pb(reg)
    missing.ClearField("last_resort_pq_prekey")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RegisterDevice(missing)
    assert raised.value.details() == "last_resort_pq_prekey is required"

    device = await register(stub, keys)
    other = DeviceKeys().pq_prekey(key_id=9)
    request = pb.PublishPrekeysRequest(
        device=address_to_pb(device), last_resort_pq_prekey=pq_pb(other)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _publish(stub, clock, keys, device, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "last_resort_pq_prekey (key_id 9): signature does not verify with identity_key"
    )


async def test_concurrent_fetches_hand_out_each_pq_key_once(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with serve(tmp_path, clock, **{"keyserver.max_bundle_fetches_per_target": 50}) as stub:
        keys, reader_keys = DeviceKeys(), DeviceKeys()
        await register(stub, keys, user="bob", one_time=range(10), one_time_pq=range(20))
        reader = await register(stub, reader_keys, user="carol")
        request = pb.FetchPrekeyBundlesRequest(tenant="acme", user="bob")
        signed = [
            sign(clock, reader_keys, reader, FETCH_PREKEY_BUNDLES_METHOD, request)
            for _ in range(50)
        ]
        replies = await asyncio.gather(
            *(stub.FetchPrekeyBundles(request, metadata=md) for md in signed)
        )
    bundles = [r.bundles[0] for r in replies]
    one_time = [b.pq_prekey.key_id for b in bundles if not b.pq_prekey_last_resort]
    assert sorted(one_time) == list(range(20))
    assert sum(b.pq_prekey_last_resort for b in bundles) == 30
    assert all(b.HasField("pq_prekey") for b in bundles)


async def test_the_low_water_mark_is_configured(tmp_path: Path, clock: FakeClock) -> None:
    keys = DeviceKeys()
    async with (
        KeyserverApp(config(tmp_path, **{"keyserver.low_water_mark": 3}), clock) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        device = await register(stub, keys, one_time=range(4), one_time_pq=range(4))
        status = (await _status(stub, clock, keys, device)).status
        assert (status.low_water_mark, status.replenish) == (3, False)
        await fetch(stub, clock, keys, device)
        status = (await _status(stub, clock, keys, device)).status
        assert (status.one_time_prekeys, status.one_time_pq_prekeys, status.replenish) == (
            3,
            3,
            True,
        )
