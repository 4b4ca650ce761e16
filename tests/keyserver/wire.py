"""Calls to a real key directory over gRPC, as a device makes them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    sign_request_metadata,
)
from relay.clock import FakeClock
from relay.common.convert import address_from_pb, address_to_pb
from relay.config import Config, load
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from tests.keyserver.keys import DeviceKeys, registration_pb

if TYPE_CHECKING:
    from relaypb.keys.v1.keys_pb2_grpc import KeyDirectoryAsyncStub


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


async def register(stub: KeyDirectoryAsyncStub, keys: DeviceKeys, **kw: Any) -> Address:
    reply = await stub.RegisterDevice(registration_pb(keys.registration(**kw)))
    return address_from_pb(reply.address)


async def publish(
    stub: KeyDirectoryAsyncStub,
    clock: FakeClock,
    keys: DeviceKeys,
    device: Address,
    request: pb.PublishPrekeysRequest,
) -> int:
    md = sign_request_metadata(PUBLISH_PREKEYS_METHOD, device, keys.signing, request, clock)
    clock.advance(1)  # the next signed request gets its own time
    return (await stub.PublishPrekeys(request, metadata=md)).one_time_prekeys_remaining


async def count(
    stub: KeyDirectoryAsyncStub, clock: FakeClock, keys: DeviceKeys, device: Address
) -> int:
    request = pb.CountOneTimePrekeysRequest(device=address_to_pb(device))
    md = sign_request_metadata(COUNT_ONE_TIME_PREKEYS_METHOD, device, keys.signing, request, clock)
    clock.advance(1)
    return (await stub.CountOneTimePrekeys(request, metadata=md)).count
