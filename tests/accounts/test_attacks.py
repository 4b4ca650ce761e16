"""What a stranger tries against accounts, on real servers and both backends.

Each attack is refused with the status a client can act on, and changes nothing: the
victim's signed list, registered devices and prekey pool read the same afterwards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from relay.accounts import ListedDevice
from relay.clock import SystemClock
from relay.errors import (
    AlreadyExists,
    FailedPrecondition,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, register_device
from relay.sdk.accounts import Accounts, generate_account_key, next_list
from relay.sdk.device import remove_device
from relay.sdk.linking import approve_link, request_link, wait_for_approval
from relaypb.common.v1 import address_pb2
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc
from tests.accounts.conftest import own, signed_in
from tests.conftest import Servers, StartServers

pytestmark = pytest.mark.integration


async def snapshot(directory: KeyDirectoryClient, state: DeviceState) -> tuple[object, ...]:
    """What the key directory says of the user of ``state``: list, devices, pool."""
    me = own(state)
    reader = signed_in(directory, state)
    identity = state.identity()
    assert identity is not None
    listed = await reader.device_list(me.tenant, me.user)
    devices = await reader.list_devices(me.tenant, me.user)
    status = await reader.prekey_status(identity, me)
    return listed, devices, status.one_time_prekeys, status.one_time_pq_prekeys


async def test_a_stranger_cannot_register_under_an_existing_user(
    srv: Servers, directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with DeviceState.open(tmp_path / "bob") as bob:
        await register_device(bob, directory, "default", user, one_time_prekeys=5)
        before = await snapshot(directory, bob)
        with DeviceState.open(tmp_path / "mallory") as mallory:
            async with grpc.aio.insecure_channel(srv.keys_address) as channel:
                with pytest.raises(AlreadyExists, match="link"):
                    await register_device(mallory, KeyDirectoryClient(channel), "default", user)
        assert await snapshot(directory, bob) == before


async def test_a_stranger_cannot_remove_a_device_or_publish_a_list(
    directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with DeviceState.open(tmp_path / "bob") as bob, DeviceState.open(tmp_path / "m") as mallory:
        await register_device(bob, directory, "default", user, one_time_prekeys=5)
        await register_device(mallory, directory, "default", f"{user}-m", one_time_prekeys=1)
        before = await snapshot(directory, bob)
        victim = own(bob)
        current = await signed_in(directory, bob).device_list(victim.tenant, victim.user)
        stranger_key = generate_account_key()
        forged = next_list(stranger_key, current, SystemClock().now_ms(), remove=[1])
        m_identity, b_identity = mallory.identity(), bob.identity()
        assert m_identity is not None and b_identity is not None
        with pytest.raises(PermissionDenied, match="only a device of"):
            await directory.remove_device(m_identity, own(mallory), victim, forged)
        # Even the user's own device cannot remove with a list the account key did not sign.
        with pytest.raises(PermissionDenied, match="not signed by the account key"):
            await directory.remove_device(b_identity, victim, victim, forged)
        private = Accounts(bob).own_private()
        stale = dataclasses.replace(
            next_list(private, current, SystemClock().now_ms(), remove=[1]), version=1
        )
        stale = next_list(private, dataclasses.replace(stale, version=0), 0, remove=[1])
        with pytest.raises(FailedPrecondition, match="must be above the current 1"):
            await directory.remove_device(b_identity, victim, victim, stale)
        assert await snapshot(directory, bob) == before


async def test_a_link_code_works_once_and_a_stranger_cannot_approve(
    srv: Servers, directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with DeviceState.open(tmp_path / "bob") as bob, DeviceState.open(tmp_path / "new") as new:
        await register_device(bob, directory, "default", user, one_time_prekeys=5)
        ticket = await request_link(new, directory, "default", user, one_time_prekeys=3)
        # A stranger (another user's device) sees none of bob's requests and cannot approve.
        with DeviceState.open(tmp_path / "m") as mallory:
            await register_device(mallory, directory, "default", f"{user}-m", one_time_prekeys=1)
            with pytest.raises(NotFound, match="no link request with code"):
                await approve_link(mallory, directory, ticket.code)
        with pytest.raises(NotFound, match="no link request with code"):
            await approve_link(bob, directory, "AAAAA-AAAAA")  # a wrong code
        linked = await approve_link(bob, directory, ticket.code)
        assert linked == Address("default", user, 2)
        before = await snapshot(directory, bob)
        with pytest.raises(NotFound, match="no link request with code"):
            await approve_link(bob, directory, ticket.code)  # the code is spent
        assert await snapshot(directory, bob) == before
        assert await wait_for_approval(new, directory) == linked
        listed = await signed_in(directory, new).device_list("default", user)
        assert listed.numbers() == (1, 2) and listed.version == 2


async def test_an_expired_link_request_cannot_be_approved_or_completed(
    start_servers: StartServers, tmp_path: Path, user: str
) -> None:
    srv = await start_servers(**{"keyserver.link_ttl_seconds": 0.001})
    async with grpc.aio.insecure_channel(srv.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        with DeviceState.open(tmp_path / "b") as bob, DeviceState.open(tmp_path / "n") as new:
            await register_device(bob, directory, "default", user, one_time_prekeys=2)
            ticket = await request_link(new, directory, "default", user, one_time_prekeys=1)
            # One millisecond of life: over by the time the next request arrives.
            with pytest.raises(NotFound, match=r"expired|no link request"):
                await approve_link(bob, directory, ticket.code)
            with pytest.raises(NotFound, match="expired"):
                await wait_for_approval(new, directory)
            assert (await signed_in(directory, bob).device_list("default", user)).numbers() == (1,)


async def test_pending_link_requests_are_limited_per_user(
    directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with DeviceState.open(tmp_path / "bob") as bob:
        await register_device(bob, directory, "default", user, one_time_prekeys=1)
    for i in range(3):
        with DeviceState.open(tmp_path / f"n{i}") as state:
            await request_link(state, directory, "default", user, one_time_prekeys=1)
    with DeviceState.open(tmp_path / "n3") as state, pytest.raises(LimitExceeded) as raised:
        await request_link(state, directory, "default", user, one_time_prekeys=1)
    assert raised.value.limit == "max_pending_links_per_user"
    with DeviceState.open(tmp_path / "n4") as state, pytest.raises(NotFound, match="init"):
        await request_link(state, directory, "default", f"{user}-nobody", one_time_prekeys=1)


async def test_anonymous_reads_are_refused_and_drains_are_rate_limited(
    start_servers: StartServers, tmp_path: Path, user: str
) -> None:
    srv = await start_servers(**{"keyserver.max_bundle_fetches_per_target": 3})
    async with grpc.aio.insecure_channel(srv.keys_address) as channel:
        stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        directory = KeyDirectoryClient(channel)
        with DeviceState.open(tmp_path / "b") as bob, DeviceState.open(tmp_path / "a") as alice:
            await register_device(bob, directory, "default", user, one_time_prekeys=20)
            await register_device(alice, directory, "other", user, one_time_prekeys=1)
            for call, request in (
                (
                    stub.FetchPrekeyBundles,
                    keys_pb2.FetchPrekeyBundlesRequest(tenant="default", user=user),
                ),
                (stub.ListDevices, keys_pb2.ListDevicesRequest(tenant="default", user=user)),
                (stub.GetDeviceList, keys_pb2.GetDeviceListRequest(tenant="default", user=user)),
                (
                    stub.GetIdentityKey,
                    keys_pb2.GetIdentityKeyRequest(
                        device=address_pb2.Address(tenant="default", user=user, device=1)
                    ),
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call(request)  # type: ignore[arg-type]
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(PermissionDenied, match="tenant 'default'"):
                await signed_in(directory, alice).fetch_bundles("default", user)
            identity = bob.identity()
            assert identity is not None
            assert (await directory.prekey_status(identity, own(bob))).one_time_prekeys == 20
            # A drain: one requester asks again and again; the per-target limit stops it.
            with DeviceState.open(tmp_path / "m") as mallory:
                await register_device(
                    mallory, directory, "default", f"{user}-m", one_time_prekeys=1
                )
                reader = signed_in(directory, mallory)
                taken = 0
                with pytest.raises(LimitExceeded) as limited:
                    for _ in range(20):
                        await reader.fetch_bundles("default", user)
                        taken += 1
            assert limited.value.limit == "max_bundle_fetches_per_target" and taken == 3
            assert "max_bundle_fetches_per_target" in limited.value.message
            assert (await directory.prekey_status(identity, own(bob))).one_time_prekeys == 17


async def test_removal_with_the_account_key_from_any_linked_device(
    directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with (
        DeviceState.open(tmp_path / "b1") as b1,
        DeviceState.open(tmp_path / "b2") as b2,
        DeviceState.open(tmp_path / "b3") as b3,
    ):
        await register_device(b1, directory, "default", user, one_time_prekeys=1)
        for state in (b2, b3):
            ticket = await request_link(state, directory, "default", user, one_time_prekeys=1)
            await approve_link(b1, directory, ticket.code)
            await wait_for_approval(state, directory)
        assert Accounts(b3).own_private() == Accounts(b1).own_private()
        # The last linked device removes the first: it holds the account key too.
        assert await remove_device(b3, directory, 1) == Address("default", user, 1)
        listed = await signed_in(directory, b2).device_list("default", user)
        assert listed.numbers() == (2, 3) and listed.version == 4
        assert listed.find(3) == ListedDevice.of(3, b3.identity().public_key)  # type: ignore[union-attr]
        with pytest.raises(Unauthenticated, match="not registered"):
            await signed_in(directory, b1).device_list("default", user)
