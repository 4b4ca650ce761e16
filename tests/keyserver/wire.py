"""Calls to a real key directory over gRPC, as a device makes them.

The servers of these tests run on a FakeClock: every signed request is signed with that
clock, which then moves on by 1 ms so that the next one gets its own time (the key
directory accepts each signed request once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from keyserver.app import KeyserverApp
from keyserver.client import (
    APPROVE_LINK_METHOD,
    COUNT_ONE_TIME_PREKEYS_METHOD,
    FETCH_PREKEY_BUNDLES_METHOD,
    GET_DEVICE_LIST_METHOD,
    GET_IDENTITY_KEY_METHOD,
    LIST_DEVICES_METHOD,
    LIST_LINK_REQUESTS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    Metadata,
    sign_request_metadata,
)
from keyserver.model import LinkRequestInput
from relay.clock import FakeClock
from relay.common.convert import (
    address_from_pb,
    address_to_pb,
    device_list_from_pb,
    device_list_to_pb,
)
from relay.config import Config, load, load_or_create_key, relay_key_path
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from relaypb.keys.v1 import keys_pb2_grpc
from tests.keyserver.keys import Account, DeviceKeys, pq_pb, registration_pb, signed_prekey_pb

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub

#: What ApproveLink carries as the account key sealed to the new device (opaque to it).
SEALED_ACCOUNT = b"s" * 96


def config(data_dir: Path, **overrides: Any) -> Config:
    return load(
        None,
        {
            "storage.data_dir": str(data_dir),
            "keyserver.listen": "127.0.0.1:0",
            "node.grace_seconds": 0.5,
            **overrides,
        },
    )


@asynccontextmanager
async def serve(
    data_dir: Path, clock: FakeClock, **overrides: Any
) -> AsyncIterator[KeyDirectoryAsyncStub]:
    """A key directory on ``data_dir`` configured with ``overrides``; yields a stub to it."""
    async with (
        KeyserverApp(config(data_dir, **overrides), clock) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        yield keys_pb2_grpc.KeyDirectoryStub(channel)


def relay_key(data_dir: Path) -> str:
    """The relay nodes' bearer key of the key directory on ``data_dir`` (after it started)."""
    return load_or_create_key(relay_key_path(config(data_dir)))


def sign(
    clock: FakeClock, keys: DeviceKeys, device: Address, method: str, request: Message
) -> Metadata:
    """Metadata signing ``request`` for ``method`` as ``device``; the clock moves on 1 ms."""
    md = sign_request_metadata(method, device, keys.signing, request, clock)
    clock.advance(1)  # the next signed request gets its own time
    return md


async def register(stub: KeyDirectoryAsyncStub, keys: DeviceKeys, **kw: Any) -> Address:
    """Create an account with its first device (``kw``: see DeviceKeys.registration)."""
    reply = await stub.RegisterDevice(registration_pb(keys.registration(**kw)))
    return address_from_pb(reply.address)


def link_request_pb(inp: LinkRequestInput) -> pb.RequestLinkRequest:
    request = pb.RequestLinkRequest(
        tenant=inp.tenant,
        user=inp.user,
        identity_key=inp.identity_key,
        identity_dh_key=inp.identity_dh_key,
        identity_dh_signature=inp.identity_dh_signature,
        link_key=inp.link_key,
        proof=inp.proof,
    )
    if inp.signed_prekey is not None:
        request.signed_prekey.CopyFrom(signed_prekey_pb(inp.signed_prekey))
    if inp.last_resort_pq_prekey is not None:
        request.last_resort_pq_prekey.CopyFrom(pq_pb(inp.last_resort_pq_prekey))
    return request


async def link(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    account: Account,
    approver_keys: DeviceKeys,
    approver_address: Address,
    new_keys: DeviceKeys,
) -> Address:
    """Link ``new_keys`` as a new device of ``account``'s user, approved by the approver.

    RequestLink by the new device; ListLinkRequests and ApproveLink (with the next list,
    signed by ``account``, which remembers it) signed by the approver; CompleteLink by
    the new device. Returns the new device's address. Right after it, ``clock.now_ms()``
    is the time the server registered the device at.
    """
    asked = await stub.RequestLink(
        link_request_pb(new_keys.link_request(account.tenant, account.user))
    )
    listing = pb.ListLinkRequestsRequest()
    waiting = await stub.ListLinkRequests(
        listing,
        metadata=sign(clock, approver_keys, approver_address, LIST_LINK_REQUESTS_METHOD, listing),
    )
    assert asked.request_id in [r.request_id for r in waiting.requests]
    assert device_list_from_pb(waiting.device_list).version == account.version
    new_list = account.with_device(waiting.next_device, new_keys.identity_key)
    approve = pb.ApproveLinkRequest(
        request_id=asked.request_id,
        device_list=device_list_to_pb(new_list),
        sealed_account=SEALED_ACCOUNT,
    )
    approved = await stub.ApproveLink(
        approve, metadata=sign(clock, approver_keys, approver_address, APPROVE_LINK_METHOD, approve)
    )
    account.commit(new_list)
    address = address_from_pb(approved.address)
    done = await stub.CompleteLink(pb.CompleteLinkRequest(request_id=asked.request_id))
    assert done.state == pb.CompleteLinkResponse.APPROVED
    assert address_from_pb(done.address) == address
    assert done.sealed_account == SEALED_ACCOUNT
    return address


async def publish(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    request: pb.PublishPrekeysRequest,
) -> int:
    md = sign(clock, keys, device, PUBLISH_PREKEYS_METHOD, request)
    return (await stub.PublishPrekeys(request, metadata=md)).one_time_prekeys_remaining


async def count(
    stub: KeyDirectoryAsyncStub, clock: FakeClock, keys: DeviceKeys, device: Address
) -> int:
    request = pb.CountOneTimePrekeysRequest(device=address_to_pb(device))
    md = sign(clock, keys, device, COUNT_ONE_TIME_PREKEYS_METHOD, request)
    return (await stub.CountOneTimePrekeys(request, metadata=md)).count


async def fetch(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    user: str = "alice",
    devices: Sequence[int] = (),
    tenant: str = "acme",
) -> list[pb.PrekeyBundle]:
    """FetchPrekeyBundles of ``tenant/user``, signed by ``device``."""
    request = pb.FetchPrekeyBundlesRequest(tenant=tenant, user=user, devices=devices)
    md = sign(clock, keys, device, FETCH_PREKEY_BUNDLES_METHOD, request)
    return list((await stub.FetchPrekeyBundles(request, metadata=md)).bundles)


async def list_devices(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    user: str = "alice",
    tenant: str = "acme",
) -> list[pb.DeviceInfo]:
    """ListDevices of ``tenant/user``, signed by ``device``."""
    request = pb.ListDevicesRequest(tenant=tenant, user=user)
    md = sign(clock, keys, device, LIST_DEVICES_METHOD, request)
    return list((await stub.ListDevices(request, metadata=md)).devices)


async def identity_key(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    target: Address,
) -> bytes:
    """GetIdentityKey of ``target``, signed by ``device``."""
    request = pb.GetIdentityKeyRequest(device=address_to_pb(target))
    md = sign(clock, keys, device, GET_IDENTITY_KEY_METHOD, request)
    return bytes((await stub.GetIdentityKey(request, metadata=md)).identity_key)


async def device_list(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    user: str = "alice",
    tenant: str = "acme",
) -> pb.SignedDeviceList:
    """GetDeviceList of ``tenant/user``, signed by ``device``."""
    request = pb.GetDeviceListRequest(tenant=tenant, user=user)
    md = sign(clock, keys, device, GET_DEVICE_LIST_METHOD, request)
    return (await stub.GetDeviceList(request, metadata=md)).device_list
