"""The core's check of device-signed requests: signature, time window, replays."""

from __future__ import annotations

import pytest

from keyserver.directory import KeyDirectory
from relay import authproof
from relay.clock import FakeClock
from relay.errors import LimitExceeded, Unauthenticated
from relay.model import Address
from tests.keyserver.conftest import MakeCore
from tests.keyserver.keys import Account, DeviceKeys, add_device

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
    clock.advance(30_000)  # the last moment its time is accepted: still remembered
    with pytest.raises(Unauthenticated, match="replayed request"):
        await core.authenticate(METHOD, device, now, b"body", signature)
    clock.advance(1)
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


async def test_a_device_past_its_quota_is_refused_while_others_are_served(
    make_core: MakeCore, clock: FakeClock
) -> None:
    core = make_core(max_signed_requests_per_device=3)
    account, keys = Account(), DeviceKeys()
    device = (await core.register(keys.registration(account=account))).address
    sibling_keys = DeviceKeys()
    sibling = (await add_device(core, account, sibling_keys)).address
    now = clock.now_ms()
    for i in range(3):
        body = bytes([i])
        assert await core.authenticate(METHOD, device, now, body, _sign(keys, device, now, body))
    over = _sign(keys, device, now, b"4")
    with pytest.raises(LimitExceeded) as info:
        await core.authenticate(METHOD, device, now, b"4", over)
    assert (info.value.limit, info.value.value) == ("max_signed_requests_per_device", 3)
    assert info.value.metadata == {"limit": "max_signed_requests_per_device", "value": "3"}
    assert f"max_signed_requests_per_device = 3 per 60 s reached for {device}" in (
        info.value.message
    )
    # Another device (of the same user, even) is still served ...
    served = _sign(sibling_keys, sibling, now, b"4")
    assert await core.authenticate(METHOD, sibling, now, b"4", served) == sibling
    # ... and a replay is refused whatever the quota left.
    with pytest.raises(Unauthenticated, match="replayed request"):
        await core.authenticate(METHOD, sibling, now, b"4", served)
    # A minute later the quota is back; the refused request was not used up, the
    # accepted ones still are (their time is still inside the window).
    clock.advance(60_000)
    assert await core.authenticate(METHOD, device, now, b"4", over) == device
    with pytest.raises(Unauthenticated, match="replayed request"):
        await core.authenticate(METHOD, device, now, bytes([0]), _sign(keys, device, now, b"\0"))
    with pytest.raises(Unauthenticated, match="replayed request"):
        await core.authenticate(METHOD, sibling, now, b"4", served)


async def test_the_replay_store_is_shared_by_every_core(
    make_core: MakeCore, clock: FakeClock
) -> None:
    # Two key directory processes on one store: a request accepted by one is a replay
    # at the other (the replay memory is in the store, not in the process).
    first, second = make_core(), make_core()
    keys, device = await _device(first)
    now = clock.now_ms()
    signature = _sign(keys, device, now)
    assert await first.authenticate(METHOD, device, now, b"body", signature) == device
    with pytest.raises(Unauthenticated, match="replayed request"):
        await second.authenticate(METHOD, device, now, b"body", signature)
