"""Device-signed requests over gRPC: missing, forged, swapped and replayed signatures;
who may read (devices of the tenant, the relay nodes' key) and the per-device quota."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.message import Message

from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    FETCH_PREKEY_BUNDLES_METHOD,
    GET_DEVICE_LIST_METHOD,
    GET_IDENTITY_KEY_METHOD,
    LIST_DEVICES_METHOD,
    PUBLISH_PREKEYS_METHOD,
    Metadata,
    bearer_metadata,
    sign_request_metadata,
)
from relay import authproof
from relay.clock import FakeClock
from relay.common.convert import address_from_pb, address_to_pb
from relay.common.status import error_info
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from tests.keyserver.keys import Account, DeviceKeys, one_time_pb, one_time_prekeys
from tests.keyserver.wire import count, link, publish, register, relay_key, serve, sign

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub

pytestmark = pytest.mark.integration


async def test_signed_requests_without_or_with_forged_headers(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    keys = DeviceKeys()
    device = await register(stub, keys)
    request = pb.PublishPrekeysRequest(
        device=address_to_pb(device), one_time_prekeys=one_time_pb(one_time_prekeys([1]))
    )
    good = dict(sign_request_metadata(PUBLISH_PREKEYS_METHOD, device, keys.signing, request, clock))
    other = dict(
        sign_request_metadata(PUBLISH_PREKEYS_METHOD, device, DeviceKeys().signing, request, clock)
    )
    dev, time, sig = (
        authproof.REQUEST_DEVICE_HEADER,
        authproof.REQUEST_TIME_HEADER,
        authproof.REQUEST_SIGNATURE_HEADER,
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, f"missing header {dev}"),
        ({dev: good[dev], time: good[time]}, f"missing header {sig}"),
        ({dev: good[dev], sig: good[sig]}, f"missing header {time}"),
        ({**good, dev: "acme/alice"}, f"header {dev} is not tenant/user/device"),
        ({**good, time: "1_700"}, f"header {time} is not a time in milliseconds"),
        ({**good, sig: other[sig]}, "does not verify with the identity key of acme/alice/1"),
        ({**good, dev: "acme/alice/2"}, "acme/alice/2 is not registered"),
        ({**good, time: str(clock.now_ms() + 1)}, "does not verify"),
        ({**good, time: str(clock.now_ms() + 60_001)}, "ms from the server's time"),
    ]
    for headers, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.PublishPrekeys(request, metadata=tuple(headers.items()))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, message
        assert message in (raised.value.details() or ""), raised.value.details()

    # The same body signed for CountOneTimePrekeys is no PublishPrekeys signature.
    swapped = sign_request_metadata(
        COUNT_ONE_TIME_PREKEYS_METHOD, device, keys.signing, request, clock
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.PublishPrekeys(request, metadata=swapped)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # A changed body invalidates the signature.
    tampered = pb.PublishPrekeysRequest()
    tampered.CopyFrom(request)
    tampered.one_time_prekeys[0].key_id = 2
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.PublishPrekeys(tampered, metadata=tuple(good.items()))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The genuine request works once; the replay does not.
    assert (
        await stub.PublishPrekeys(request, metadata=tuple(good.items()))
    ).one_time_prekeys_remaining == 1
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.PublishPrekeys(request, metadata=tuple(good.items()))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed request" in (raised.value.details() or "")


async def test_a_device_cannot_publish_for_another(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    mine, theirs, account = DeviceKeys(), DeviceKeys(), Account()
    me = await register(stub, mine, account=account)
    them = await link(stub, clock, account, mine, me, theirs)
    request = pb.PublishPrekeysRequest(
        device=address_to_pb(them), one_time_prekeys=one_time_pb(one_time_prekeys([1]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publish(stub, clock, mine, me, request)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await count(stub, clock, theirs, them) == 0


def _reads(target: Address) -> list[tuple[str, Message]]:
    """Every authenticated read of the key directory, each asking about ``target``."""
    return [
        (
            FETCH_PREKEY_BUNDLES_METHOD,
            pb.FetchPrekeyBundlesRequest(tenant=target.tenant, user=target.user),
        ),
        (LIST_DEVICES_METHOD, pb.ListDevicesRequest(tenant=target.tenant, user=target.user)),
        (GET_IDENTITY_KEY_METHOD, pb.GetIdentityKeyRequest(device=address_to_pb(target))),
        (GET_DEVICE_LIST_METHOD, pb.GetDeviceListRequest(tenant=target.tenant, user=target.user)),
    ]


async def _read(
    stub: KeyDirectoryAsyncStub, method: str, request: Message, metadata: Metadata = ()
) -> Message:
    call = getattr(stub, method.rsplit("/", 1)[1])
    reply: Message = await call(request, metadata=metadata)
    return reply


async def _read_status(
    stub: KeyDirectoryAsyncStub, method: str, request: Message, metadata: Metadata = ()
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _read(stub, method, request, metadata)
    return raised.value.code(), raised.value.details() or ""


async def test_anonymous_reads_are_unauthenticated(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    keys = DeviceKeys()
    device = await register(stub, keys, one_time=[1])
    for method, request in _reads(device):
        code, details = await _read_status(stub, method, request)
        assert code == grpc.StatusCode.UNAUTHENTICATED, method
        assert "signed by a device of the tenant, or a bearer key" in details, details
        for bad in ("Basic abc", "Bearer ", "Bearer not-a-known-key-at-all"):
            code, _ = await _read_status(stub, method, request, (("authorization", bad),))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, bad)
        # Signed for another method, or by another key: no read either.
        other = PUBLISH_PREKEYS_METHOD
        code, _ = await _read_status(
            stub, method, request, sign(clock, keys, device, other, request)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED, method
        forged = sign(clock, DeviceKeys(), device, method, request)
        code, details = await _read_status(stub, method, request, forged)
        assert code == grpc.StatusCode.UNAUTHENTICATED, method
        assert "does not verify with the identity key of acme/alice/1" in details
    # None of the refused reads claimed the one-time key.
    assert await count(stub, clock, keys, device) == 1


async def test_reads_are_for_callers_of_the_same_tenant(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    alice_keys, bob_keys, mallory_keys = DeviceKeys(), DeviceKeys(), DeviceKeys()
    alice = await register(stub, alice_keys, one_time=[1])
    bob = await register(stub, bob_keys, user="bob")
    mallory = await register(stub, mallory_keys, tenant="zeta", user="mallory")
    for method, request in _reads(alice):
        md = sign(clock, mallory_keys, mallory, method, request)
        code, details = await _read_status(stub, method, request, md)
        assert code == grpc.StatusCode.PERMISSION_DENIED, method
        assert "zeta/mallory/1 may not" in details and "tenant 'acme'" in details, details
    # In her own tenant she reads: the same name there is another user, who has no device.
    listing = pb.ListDevicesRequest(tenant="zeta", user="alice")
    md = sign(clock, mallory_keys, mallory, LIST_DEVICES_METHOD, listing)
    assert list((await stub.ListDevices(listing, metadata=md)).devices) == []
    # Any device of the tenant may read any user of it.
    replies = [
        await _read(stub, method, request, sign(clock, bob_keys, bob, method, request))
        for method, request in _reads(alice)
    ]
    fetched, listed, key, stored = replies
    assert isinstance(fetched, pb.FetchPrekeyBundlesResponse)
    assert [b.one_time_prekey.key_id for b in fetched.bundles] == [1]
    assert isinstance(listed, pb.ListDevicesResponse)
    assert [address_from_pb(d.address) for d in listed.devices] == [alice]
    assert isinstance(key, pb.GetIdentityKeyResponse)
    assert key.identity_key == alice_keys.identity_key
    assert isinstance(stored, pb.GetDeviceListResponse)
    assert [d.identity_key for d in stored.device_list.devices] == [alice_keys.identity_key]


async def test_the_relay_nodes_read_with_their_key_but_fetch_no_bundles(
    stub: KeyDirectoryAsyncStub, clock: FakeClock, tmp_path: Path
) -> None:
    keys, mallory_keys = DeviceKeys(), DeviceKeys()
    alice = await register(stub, keys, one_time=[1])
    mallory = await register(stub, mallory_keys, tenant="zeta", user="mallory")
    relay = bearer_metadata(relay_key(tmp_path))
    fetch_method, fetch_request = _reads(alice)[0]
    code, details = await _read_status(stub, fetch_method, fetch_request, relay)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "relay nodes do not fetch prekey bundles" in details
    assert await count(stub, clock, keys, alice) == 1
    for target, target_keys in ((alice, keys), (mallory, mallory_keys)):  # every tenant
        listed, key, stored = [await _read(stub, m, r, relay) for m, r in _reads(target)[1:]]
        assert isinstance(listed, pb.ListDevicesResponse)
        assert [address_from_pb(d.address) for d in listed.devices] == [target]
        assert isinstance(key, pb.GetIdentityKeyResponse)
        assert key.identity_key == target_keys.identity_key
        assert isinstance(stored, pb.GetDeviceListResponse)
        assert [d.identity_key for d in stored.device_list.devices] == [target_keys.identity_key]


async def test_a_device_past_its_quota_is_resource_exhausted(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with serve(tmp_path, clock, **{"keyserver.max_signed_requests_per_device": 2}) as stub:
        alice_keys, bob_keys = DeviceKeys(), DeviceKeys()
        alice = await register(stub, alice_keys)
        bob = await register(stub, bob_keys, user="bob")
        assert await count(stub, clock, alice_keys, alice) == 0
        assert await count(stub, clock, alice_keys, alice) == 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await count(stub, clock, alice_keys, alice)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_signed_requests_per_device = 2 per 60 s" in (raised.value.details() or "")
        info = error_info(raised.value)
        assert info is not None
        assert dict(info.metadata) == {"limit": "max_signed_requests_per_device", "value": "2"}
        # Another device is still served; its accepted request is still not replayable.
        request = pb.CountOneTimePrekeysRequest(device=address_to_pb(bob))
        md = sign(clock, bob_keys, bob, COUNT_ONE_TIME_PREKEYS_METHOD, request)
        assert (await stub.CountOneTimePrekeys(request, metadata=md)).count == 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CountOneTimePrekeys(request, metadata=md)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replayed request" in (raised.value.details() or "")
        # Reads signed by the device count too; a minute later it is served again.
        listing = pb.ListDevicesRequest(tenant="acme", user="bob")
        md = sign(clock, alice_keys, alice, LIST_DEVICES_METHOD, listing)
        code, _ = await _read_status(stub, LIST_DEVICES_METHOD, listing, md)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        clock.advance(60_000)
        assert await count(stub, clock, alice_keys, alice) == 0
