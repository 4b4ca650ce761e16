"""RemoveDevice: in the core, and over gRPC with device-signed requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest

from keyserver.client import REMOVE_DEVICE_METHOD, sign_request_metadata
from keyserver.directory import KeyDirectory
from relay.clock import FakeClock
from relay.common.convert import address_from_pb, address_to_pb
from relay.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from tests.keyserver.keys import DeviceKeys
from tests.keyserver.wire import count, register

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub


async def _devices(core: KeyDirectory, n: int, user: str = "alice") -> list[Address]:
    return [
        (
            await core.register(DeviceKeys().registration(user=user, one_time=[1], one_time_pq=[1]))
        ).address
        for _ in range(n)
    ]


async def test_a_device_removes_itself_or_a_sibling(core: KeyDirectory, clock: FakeClock) -> None:
    one, two, three = await _devices(core, 3)
    clock.advance(7)
    removed = await core.remove_device(one, two)  # a sibling
    assert removed.address == two
    await core.remove_device(three, three)  # itself
    assert [r.address for r in await core.list_devices("acme", "alice")] == [one]
    assert [b.device.address for b in await core.fetch_bundles("acme", "alice", [])] == [one]
    for gone in (two, three):
        with pytest.raises(NotFound, match=f"device {gone} is not registered"):
            await core.identity_key(gone)
        with pytest.raises(NotFound, match=f"device {gone} is not registered"):
            await core.fetch_bundles("acme", "alice", [gone.device])
        with pytest.raises(NotFound):
            await core.remove_device(one, gone)  # removed already
        with pytest.raises(Unauthenticated, match="is not registered"):
            await core.authenticate("/x", gone, clock.now_ms(), b"", bytes(64))
    # Neither number is given out again, though 3 was the highest.
    assert (await _devices(core, 1))[0].device == 4


async def test_removal_is_limited_to_the_callers_own_user(core: KeyDirectory) -> None:
    [alice] = await _devices(core, 1)
    [bob] = await _devices(core, 1, user="bob")
    with pytest.raises(PermissionDenied, match="acme/bob/1 may not remove device acme/alice/1"):
        await core.remove_device(bob, alice)
    with pytest.raises(PermissionDenied):
        await core.remove_device(bob, Address("acme", "alice", 99))  # existence not revealed
    with pytest.raises(PermissionDenied):
        await core.remove_device(Address("zeta", "alice", 1), alice)  # same user, other tenant
    with pytest.raises(NotFound, match="acme/alice/99 is not registered"):
        await core.remove_device(alice, Address("acme", "alice", 99))
    with pytest.raises(InvalidArgument, match=r"device\.device 0"):
        await core.remove_device(alice, Address("acme", "alice", 0))
    assert [r.address for r in await core.list_devices("acme", "alice")] == [alice]


def _remove_request(device: Address) -> pb.RemoveDeviceRequest:
    return pb.RemoveDeviceRequest(device=address_to_pb(device))


async def _remove(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    caller: Address,
    device: Address,
) -> None:
    request = _remove_request(device)
    md = sign_request_metadata(REMOVE_DEVICE_METHOD, caller, keys.signing, request, clock)
    clock.advance(1)
    await stub.RemoveDevice(request, metadata=md)


@pytest.mark.integration
async def test_remove_device_over_grpc(stub: KeyDirectoryAsyncStub, clock: FakeClock) -> None:
    phone, laptop, tablet, bob = DeviceKeys(), DeviceKeys(), DeviceKeys(), DeviceKeys()
    one = await register(stub, phone, one_time=[1], one_time_pq=[1])
    two = await register(stub, laptop, one_time=[1], one_time_pq=[1])
    three = await register(stub, tablet)
    bob1 = await register(stub, bob, user="bob")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RemoveDevice(_remove_request(two))  # unsigned
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _remove(stub, clock, bob, bob1, two)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Signed for another method: not a RemoveDevice signature.
    request = _remove_request(two)
    md = sign_request_metadata(
        "/relaypb.keys.v1.KeyDirectory/PublishPrekeys", one, phone.signing, request, clock
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RemoveDevice(request, metadata=md)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await _remove(stub, clock, phone, one, two)  # a sibling
    await _remove(stub, clock, tablet, three, three)  # itself
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _remove(stub, clock, phone, one, two)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    listed = await stub.ListDevices(pb.ListDevicesRequest(tenant="acme", user="alice"))
    assert [address_from_pb(d.address) for d in listed.devices] == [one]
    fetched = await stub.FetchPrekeyBundles(
        pb.FetchPrekeyBundlesRequest(tenant="acme", user="alice")
    )
    assert [address_from_pb(b.address) for b in fetched.bundles] == [one]
    for gone in (two, three):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetIdentityKey(pb.GetIdentityKeyRequest(device=address_to_pb(gone)))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await count(stub, clock, laptop, two)  # the removed device's signature is refused
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await register(stub, DeviceKeys()) == Address("acme", "alice", 4)
