"""RemoveDevice: in the core, and over gRPC with device-signed requests."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import grpc
import pytest

from keyserver.client import PUBLISH_PREKEYS_METHOD, REMOVE_DEVICE_METHOD
from keyserver.directory import KeyDirectory
from relay.accounts import DeviceList
from relay.clock import FakeClock
from relay.common.convert import address_from_pb, address_to_pb, device_list_to_pb
from relay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from tests.keyserver.keys import Account, DeviceKeys, add_device
from tests.keyserver.wire import (
    count,
    device_list,
    fetch,
    identity_key,
    link,
    list_devices,
    register,
    sign,
)

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub


async def _user(core: KeyDirectory, n: int, user: str = "alice") -> tuple[Account, list[Address]]:
    """A new user with ``n`` devices: the first registered, the others linked."""
    account = Account(user=user)
    reg = DeviceKeys().registration(user=user, one_time=[1], one_time_pq=[1], account=account)
    devices = [(await core.register(reg)).address]
    for _ in range(n - 1):
        devices.append((await add_device(core, account)).address)
    return account, devices


async def _remove(
    core: KeyDirectory, account: Account, caller: Address, device: Address
) -> DeviceList:
    """Remove ``device`` with the next list signed by ``account`` (which remembers it)."""
    without = account.without(device.device)
    removed = await core.remove_device(caller, device, without)
    assert removed.address == device
    return account.commit(without)


async def test_a_device_removes_itself_or_a_sibling(core: KeyDirectory, clock: FakeClock) -> None:
    account, (one, two, three) = await _user(core, 3)
    clock.advance(7)
    await _remove(core, account, one, two)  # a sibling
    latest = await _remove(core, account, three, three)  # itself
    assert await core.device_list("acme", "alice") == latest
    assert latest.numbers() == (1,)
    assert [r.address for r in await core.list_devices("acme", "alice")] == [one]
    assert [b.device.address for b in await core.fetch_bundles("acme", "alice", [])] == [one]
    for gone in (two, three):
        with pytest.raises(NotFound, match=f"device {gone} is not registered"):
            await core.identity_key(gone)
        with pytest.raises(NotFound, match=f"device {gone} is not registered"):
            await core.fetch_bundles("acme", "alice", [gone.device])
        with pytest.raises(NotFound):
            await core.remove_device(one, gone, account.without(gone.device))  # removed already
        with pytest.raises(Unauthenticated, match="is not registered"):
            await core.authenticate("/x", gone, clock.now_ms(), b"", bytes(64))
    # Neither number is given out again, though 3 was the highest.
    assert (await add_device(core, account)).address.device == 4


async def test_removal_needs_the_next_list_signed_by_the_account_key(
    core: KeyDirectory,
) -> None:
    account, (one, two) = await _user(core, 2)
    current = await core.device_list("acme", "alice")
    stranger = Account()  # another key, signing the very list the account would
    stranger.devices = list(account.devices)
    stranger.version = account.version
    still_listed = account.listed(account.devices, account.version + 1)
    both_gone = account.listed([], account.version + 1)
    stale = account.listed([d for d in account.devices if d.device != 2], account.version)
    cases: list[tuple[DeviceList | None, type[Exception], str]] = [
        (None, InvalidArgument, "device_list is required"),
        (stranger.without(2), PermissionDenied, "not signed by the account key of acme/alice"),
        (
            replace(account.without(2), signature=bytes(64)),
            PermissionDenied,
            "not signed by the account key",
        ),
        (still_listed, FailedPrecondition, "without device 2"),
        (both_gone, FailedPrecondition, "without device 2"),
        (stale, FailedPrecondition, f"must be above the current {account.version}"),
        (
            Account(user="bob").listed([], 1),
            InvalidArgument,
            "device_list is for another user than acme/alice",
        ),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            await core.remove_device(one, two, bad)
    # None of the refused removals changed anything.
    assert await core.device_list("acme", "alice") == current
    assert [r.address for r in await core.list_devices("acme", "alice")] == [one, two]
    latest = await _remove(core, account, one, two)
    assert await core.device_list("acme", "alice") == latest
    # The list it was removed with cannot be used again (its version is the current one).
    with pytest.raises(FailedPrecondition, match="must be above"):
        await core.remove_device(one, one, latest)


async def test_removal_is_limited_to_the_callers_own_user(core: KeyDirectory) -> None:
    alice_account, [alice] = await _user(core, 1)
    bob_account, [bob] = await _user(core, 1, user="bob")
    with pytest.raises(PermissionDenied, match="acme/bob/1 may not remove device acme/alice/1"):
        await core.remove_device(bob, alice, bob_account.without(1))
    with pytest.raises(PermissionDenied, match="acme/bob/1 may not remove device acme/alice/1"):
        await core.remove_device(bob, alice, alice_account.without(1))  # even with a good list
    with pytest.raises(PermissionDenied):  # existence not revealed
        await core.remove_device(bob, Address("acme", "alice", 99), alice_account.without(99))
    with pytest.raises(PermissionDenied):  # same user, other tenant
        await core.remove_device(Address("zeta", "alice", 1), alice, alice_account.without(1))
    with pytest.raises(NotFound, match="acme/alice/99 is not registered"):
        await core.remove_device(alice, Address("acme", "alice", 99), alice_account.without(99))
    with pytest.raises(InvalidArgument, match=r"device\.device 0"):
        await core.remove_device(alice, Address("acme", "alice", 0), alice_account.without(0))
    assert [r.address for r in await core.list_devices("acme", "alice")] == [alice]
    assert (await core.device_list("acme", "alice")).version == 1


def _remove_request(device: Address, new_list: DeviceList | None = None) -> pb.RemoveDeviceRequest:
    request = pb.RemoveDeviceRequest(device=address_to_pb(device))
    if new_list is not None:
        request.device_list.CopyFrom(device_list_to_pb(new_list))
    return request


async def _remove_over_grpc(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    caller: Address,
    device: Address,
    new_list: DeviceList,
) -> None:
    request = _remove_request(device, new_list)
    await stub.RemoveDevice(
        request, metadata=sign(clock, keys, caller, REMOVE_DEVICE_METHOD, request)
    )


async def _alice_and_bob(
    stub: KeyDirectoryAsyncStub, clock: FakeClock, *devices: DeviceKeys
) -> tuple[Account, list[Address], Account, Address]:
    """alice with ``devices`` (the first registered, the others linked by it), and bob."""
    account = Account()
    first = await register(stub, devices[0], one_time=[1], one_time_pq=[1], account=account)
    addresses = [first]
    for keys in devices[1:]:
        addresses.append(await link(stub, clock, account, devices[0], first, keys))
    assert addresses == [Address("acme", "alice", n) for n in range(1, len(devices) + 1)]
    bob_account = Account(user="bob")
    bob = await register(stub, DeviceKeys(), user="bob", account=bob_account)
    return account, addresses, bob_account, bob


@pytest.mark.integration
async def test_refused_removals_over_grpc(stub: KeyDirectoryAsyncStub, clock: FakeClock) -> None:
    phone, laptop = DeviceKeys(), DeviceKeys()
    account, (one, two), bob_account, bob = await _alice_and_bob(stub, clock, phone, laptop)
    bob_keys = DeviceKeys()  # not bob's: a signature by it does not verify

    async def refused(
        keys: DeviceKeys, caller: Address, new_list: DeviceList | None, method: str
    ) -> tuple[grpc.StatusCode, str]:
        request = _remove_request(two, new_list)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.RemoveDevice(request, metadata=sign(clock, keys, caller, method, request))
        return raised.value.code(), raised.value.details() or ""

    remove = REMOVE_DEVICE_METHOD
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RemoveDevice(_remove_request(two, account.without(2)))  # unsigned
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await refused(bob_keys, bob, account.without(2), remove)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # Signed for another method: not a RemoveDevice signature.
    code, _ = await refused(phone, one, account.without(2), PUBLISH_PREKEYS_METHOD)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, details = await refused(phone, one, None, remove)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "device_list is required" in details
    still_listed = account.listed(account.devices, account.version + 1)
    code, details = await refused(phone, one, still_listed, remove)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "without device 2" in details
    code, _ = await refused(phone, one, bob_account.without(2), remove)  # bob's list
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    stray = Account()  # alice's list, signed by another key
    stray.devices, stray.version = list(account.devices), account.version
    code, _ = await refused(phone, one, stray.without(2), remove)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert [address_from_pb(d.address) for d in await list_devices(stub, clock, phone, one)] == [
        one,
        two,
    ]
    assert await count(stub, clock, laptop, two) == 0  # still registered, still signing


@pytest.mark.integration
async def test_a_device_of_another_user_cannot_remove(
    stub: KeyDirectoryAsyncStub, clock: FakeClock
) -> None:
    bob_keys = DeviceKeys()
    account = Account()
    alice = await register(stub, DeviceKeys(), account=account)
    bob_account = Account(user="bob")
    bob = await register(stub, bob_keys, user="bob", account=bob_account)
    for new_list in (bob_account.without(1), account.without(1)):
        request = _remove_request(alice, new_list)
        md = sign(clock, bob_keys, bob, REMOVE_DEVICE_METHOD, request)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.RemoveDevice(request, metadata=md)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "acme/bob/1 may not remove device acme/alice/1" in (raised.value.details() or "")


@pytest.mark.integration
async def test_remove_device_over_grpc(stub: KeyDirectoryAsyncStub, clock: FakeClock) -> None:
    phone, laptop, tablet, bob_keys = DeviceKeys(), DeviceKeys(), DeviceKeys(), DeviceKeys()
    account, (one, two, three), _, _ = await _alice_and_bob(stub, clock, phone, laptop, tablet)
    bob = await register(stub, bob_keys, user="carol")

    await _remove_over_grpc(stub, clock, phone, one, two, account.without(2))  # a sibling
    account.commit(account.without(2))
    await _remove_over_grpc(stub, clock, tablet, three, three, account.without(3))  # itself
    latest = account.commit(account.without(3))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _remove_over_grpc(stub, clock, phone, one, two, account.without(2))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    stored = await device_list(stub, clock, phone, one)
    assert stored == device_list_to_pb(latest)
    assert [d.device for d in stored.devices] == [1]
    listed = await list_devices(stub, clock, phone, one)
    assert [address_from_pb(d.address) for d in listed] == [one]
    fetched = await fetch(stub, clock, bob_keys, bob)  # another user of the tenant reads
    assert [address_from_pb(b.address) for b in fetched] == [one]
    for gone in (two, three):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await identity_key(stub, clock, phone, one, gone)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await count(stub, clock, laptop, two)  # the removed device's signature is refused
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A new device of alice is linked, not registered, and gets a number never used.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await register(stub, DeviceKeys())
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await link(stub, clock, account, phone, one, DeviceKeys()) == Address("acme", "alice", 4)
