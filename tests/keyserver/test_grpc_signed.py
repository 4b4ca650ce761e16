"""Device-signed requests over gRPC: missing, forged, swapped and replayed signatures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest

from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    sign_request_metadata,
)
from relay import authproof
from relay.clock import FakeClock
from relay.common.convert import address_to_pb
from relaypb.keys.v1 import keys_pb2 as pb
from tests.keyserver.keys import DeviceKeys, one_time_pb, one_time_prekeys
from tests.keyserver.wire import count, publish, register

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
    mine, theirs = DeviceKeys(), DeviceKeys()
    me = await register(stub, mine)
    them = await register(stub, theirs)
    request = pb.PublishPrekeysRequest(
        device=address_to_pb(them), one_time_prekeys=one_time_pb(one_time_prekeys([1]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publish(stub, clock, mine, me, request)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await count(stub, clock, theirs, them) == 0
