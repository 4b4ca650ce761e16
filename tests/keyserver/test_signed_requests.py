"""The core's check of device-signed requests: signature, time window, replays."""

from __future__ import annotations

import pytest

from keyserver.directory import KeyDirectory
from relay import authproof
from relay.clock import FakeClock
from relay.errors import Unauthenticated, Unavailable
from relay.model import Address
from tests.keyserver.conftest import MakeCore
from tests.keyserver.keys import DeviceKeys

METHOD = "/relaypb.keys.v1.KeyDirectory/PublishPrekeys"


async def _device(core: KeyDirectory) -> tuple[DeviceKeys, Address]:
    keys = DeviceKeys()
    return keys, (await core.register(keys.registration())).address


def _sign(keys: DeviceKeys, address: Address, time_ms: int, body: bytes = b"body") -> bytes:
    return keys.sign(authproof.request_transcript(METHOD, address, time_ms, body))


async def test_a_signed_request_is_accepted_once(core: KeyDirectory, clock: FakeClock) -> None:
    keys, device = await _device(core)
    now = clock.now_ms()
    signature = _sign(keys, device, now)
    assert await core.authenticate(METHOD, device, now, b"body", signature) == device
    clock.advance(30_000)
    with pytest.raises(Unauthenticated, match="replayed request"):
        await core.authenticate(METHOD, device, now, b"body", signature)
    clock.advance(30_001)
    with pytest.raises(Unauthenticated, match="60001 ms from the server's time"):
        await core.authenticate(METHOD, device, now, b"body", signature)


@pytest.mark.parametrize(
    ("offset", "accepted"), [(-60_000, True), (60_000, True), (-60_001, False), (60_001, False)]
)
async def test_request_time_window(
    core: KeyDirectory, clock: FakeClock, offset: int, accepted: bool
) -> None:
    keys, device = await _device(core)
    time_ms = clock.now_ms() + offset
    call = core.authenticate(METHOD, device, time_ms, b"body", _sign(keys, device, time_ms))
    if accepted:
        assert await call == device
    else:
        with pytest.raises(Unauthenticated, match="at most 60000 ms allowed"):
            await call


async def test_forged_signed_requests_are_rejected(core: KeyDirectory, clock: FakeClock) -> None:
    keys, device = await _device(core)
    now = clock.now_ms()
    good = _sign(keys, device, now)
    cases = [
        (device, now, b"body", DeviceKeys().sign(b"x"), "does not verify with the identity key"),
        (device, now, b"other body", good, "does not verify with the identity key of acme/alice/1"),
        (device, now + 1, b"body", good, "does not verify"),
        (device, now, b"body", good[:63], "does not verify"),
        (Address("acme", "alice", 2), now, b"body", good, "acme/alice/2 is not registered"),
        (Address("acme", "alice", 0), now, b"body", good, "signing device.device 0"),
    ]
    for address, time_ms, body, signature, message in cases:
        with pytest.raises(Unauthenticated, match=message):
            await core.authenticate(METHOD, address, time_ms, body, signature)
    other_method = keys.sign(authproof.request_transcript("/x/Count", device, now, b"body"))
    with pytest.raises(Unauthenticated, match="does not verify"):
        await core.authenticate(METHOD, device, now, b"body", other_method)
    # The genuine request is still accepted: the failures above did not use it up.
    assert await core.authenticate(METHOD, device, now, b"body", good) == device


async def test_replay_cache_is_bounded_without_forgetting_early(
    make_core: MakeCore, clock: FakeClock
) -> None:
    core = make_core(replay_cache_entries=3)
    keys, device = await _device(core)
    now = clock.now_ms()
    for i in range(3):
        body = bytes([i])
        await core.authenticate(METHOD, device, now, body, _sign(keys, device, now, body))
    with pytest.raises(Unavailable, match="retry later"):
        await core.authenticate(METHOD, device, now, b"4", _sign(keys, device, now, b"4"))
    clock.advance(60_001)
    later = clock.now_ms()
    assert await core.authenticate(METHOD, device, later, b"4", _sign(keys, device, later, b"4"))
