"""The key directory core on the embedded store, with a fake clock."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyserver.directory import KeyDirectory
from keyserver.model import Reader, Registration, SignedPrekey
from relay import authproof
from relay.clock import FakeClock
from relay.errors import (
    AlreadyExists,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
)
from relay.model import Address
from tests.keyserver.conftest import MakeCore
from tests.keyserver.keys import Account, DeviceKeys, add_device, one_time_prekeys, x25519


async def test_register_numbers_devices_and_stamps_the_time(
    core: KeyDirectory, clock: FakeClock
) -> None:
    account = Account()
    first = await core.register(DeviceKeys().registration(one_time=range(3), account=account))
    assert first.registered_at_ms == clock.now_ms()
    clock.advance(5)
    second = await add_device(core, account)
    clock.advance(5)
    third = await add_device(core, account)
    assert first.address == Address("acme", "alice", 1)
    assert second.address == Address("acme", "alice", 2)
    assert third.address == Address("acme", "alice", 3)
    assert second.registered_at_ms == clock.now_ms() - 5
    assert third.registered_at_ms == clock.now_ms()
    assert await core.list_devices("acme", "alice") == (first, second, third)
    assert await core.identity_key(first.address) == first.identity_key
    assert await core.identity_key(third.address) == third.identity_key
    # The stored list is the one the account key signed last.
    stored = await core.device_list("acme", "alice")
    assert (stored.version, stored.numbers()) == (3, (1, 2, 3))
    assert stored.signature == account.listed(account.devices, account.version).signature


async def test_a_second_registration_of_a_user_already_exists(core: KeyDirectory) -> None:
    first = await core.register(DeviceKeys().registration(one_time=[1]))
    # Another device with a new account of its own: the name is taken.
    with pytest.raises(AlreadyExists, match="user acme/alice exists already") as info:
        await core.register(DeviceKeys().registration())
    assert info.value.metadata == {"tenant": "acme", "user": "alice"}
    assert "relayctl link alice" in info.value.message
    assert await core.list_devices("acme", "alice") == (first,)
    # Another user of the tenant, or the same name in another tenant, is free.
    assert (await core.register(DeviceKeys().registration(user="bob"))).address.device == 1
    zeta = await core.register(DeviceKeys().registration(tenant="zeta"))
    assert zeta.address == Address("zeta", "alice", 1)


def _other_signature(data: bytes) -> bytes:
    return DeviceKeys().sign(data)


def _bad_registrations(keys: DeviceKeys) -> dict[str, tuple[dict[str, Any], str]]:
    good = keys.registration()
    spk = good.signed_prekey
    assert spk is not None
    ik, dhk = good.identity_key, good.identity_dh_key
    return {
        "tenant": ({"tenant": "Not A Tenant"}, "request.tenant"),
        "user": ({"user": "a/b"}, "request.user"),
        "empty user": ({"user": ""}, "request.user"),
        "short identity key": ({"identity_key": ik[:31]}, "identity_key must be 32 bytes"),
        "long dh key": ({"identity_dh_key": dhk + b"x"}, "identity_dh_key must be 32 bytes"),
        "short dh signature": (
            {"identity_dh_signature": b"x" * 63},
            "identity_dh_signature must be 64 bytes",
        ),
        "short proof": ({"proof": b""}, "proof must be 64 bytes"),
        "proof by another key": (
            {
                "proof": _other_signature(
                    authproof.registration_transcript("acme", "alice", ik, dhk)
                )
            },
            "proof does not verify with identity_key",
        ),
        "proof for another user": (
            {"proof": keys.sign(authproof.registration_transcript("acme", "bob", ik, dhk))},
            "proof does not verify with identity_key",
        ),
        "dh signature by another key": (
            {"identity_dh_signature": _other_signature(authproof.identity_dh_transcript(dhk))},
            "identity_dh_signature does not verify with identity_key",
        ),
        "dh signature over another key": (
            {"identity_dh_signature": keys.sign(authproof.identity_dh_transcript(x25519()))},
            "identity_dh_signature does not verify with identity_key",
        ),
        "no signed prekey": ({"signed_prekey": None}, "signed_prekey is required"),
        "signed prekey by another key": (
            {"signed_prekey": replace(spk, signature=DeviceKeys().signed_prekey().signature)},
            "signed_prekey.signature does not verify with identity_key",
        ),
        "signed prekey signed for another purpose": (
            {
                "signed_prekey": replace(
                    spk, signature=keys.sign(authproof.identity_dh_transcript(spk.public_key))
                )
            },
            "signed_prekey.signature does not verify with identity_key",
        ),
        "short signed prekey": (
            {"signed_prekey": replace(spk, public_key=spk.public_key[:31])},
            "signed_prekey.public_key must be 32 bytes",
        ),
        "signed prekey key id": (
            {"signed_prekey": replace(spk, key_id=2**32)},
            "signed_prekey.key_id 4294967296 is out of range",
        ),
        "one-time key length": (
            {
                "one_time_prekeys": (
                    *one_time_prekeys([1]),
                    replace(one_time_prekeys([2])[0], public_key=b"k"),
                )
            },
            "one_time_prekeys[1].public_key must be 32 bytes",
        ),
        "one-time key id twice": (
            {"one_time_prekeys": one_time_prekeys([7, 7])},
            "one_time_prekeys[1].key_id 7 repeats",
        ),
        "one-time key id range": (
            {"one_time_prekeys": one_time_prekeys([-1])},
            "one_time_prekeys[0].key_id -1 is out of range",
        ),
    }


CASES = sorted(_bad_registrations(DeviceKeys()))


@pytest.mark.parametrize("case", CASES)
async def test_bad_registration_is_rejected_naming_the_field(core: KeyDirectory, case: str) -> None:
    keys = DeviceKeys()
    changes, message = _bad_registrations(keys)[case]
    with pytest.raises(InvalidArgument) as info:
        await core.register(replace(keys.registration(), **changes))
    assert message in info.value.message
    assert await core.list_devices("acme", "alice") == ()


async def test_the_unchanged_registration_of_those_cases_is_accepted(core: KeyDirectory) -> None:
    # The bad cases above differ from this one only in the named field.
    assert (await core.register(DeviceKeys().registration())).address.device == 1


async def test_small_order_identity_key_is_rejected_though_its_proofs_verify(
    core: KeyDirectory,
) -> None:
    identity = bytes([1]) + bytes(31)
    forged = identity + bytes(32)  # verifies for any message under this key
    dhk, spk = x25519(), x25519()
    reg = Registration(
        tenant="acme",
        user="alice",
        identity_key=identity,
        identity_dh_key=dhk,
        identity_dh_signature=forged,
        signed_prekey=SignedPrekey(1, spk, forged),
        one_time_prekeys=(),
        proof=forged,
    )
    transcript = authproof.registration_transcript("acme", "alice", identity, dhk)
    # Plain Ed25519 accepts the forgery; authproof.verify refuses small-order keys.
    Ed25519PublicKey.from_public_bytes(identity).verify(forged, transcript)
    assert not authproof.verify(identity, forged, transcript)
    with pytest.raises(InvalidArgument, match="identity_key is a small-order point"):
        await core.register(reg)


async def test_too_many_one_time_prekeys_in_one_request(core: KeyDirectory) -> None:
    with pytest.raises(LimitExceeded) as info:
        await core.register(DeviceKeys().registration(one_time=range(101)))
    assert (info.value.limit, info.value.value) == ("max_one_time_prekeys_per_request", 100)
    assert info.value.metadata == {"limit": "max_one_time_prekeys_per_request", "value": "100"}
    assert "max_one_time_prekeys_per_request" in info.value.message


async def test_a_device_holds_at_most_max_one_time_prekeys(
    core: KeyDirectory, clock: FakeClock
) -> None:
    keys = DeviceKeys()
    device = (await core.register(keys.registration(one_time=range(100)))).address
    for batch in range(1, 10):
        ids = range(batch * 100, batch * 100 + 100)
        status = await core.publish_prekeys(device, device, None, one_time_prekeys(ids))
        assert status.one_time_prekeys == (batch + 1) * 100
    rotated = keys.signed_prekey(key_id=2)
    with pytest.raises(LimitExceeded) as info:
        await core.publish_prekeys(device, device, rotated, one_time_prekeys([5000]))
    assert (info.value.limit, info.value.value) == ("max_one_time_prekeys", 1000)
    assert "max_one_time_prekeys = 1000" in info.value.message
    assert await core.count_one_time_prekeys(device, device) == 1000
    # The refused request changed nothing, not even the signed prekey.
    bundle = (await core.fetch_bundles("acme", "alice", []))[0]
    assert bundle.signed_prekey is not None
    assert bundle.signed_prekey.key_id == 1


async def test_publish_rotates_the_signed_prekey_and_checks_it(core: KeyDirectory) -> None:
    keys = DeviceKeys()
    device = (await core.register(keys.registration())).address
    rotated = keys.signed_prekey(key_id=9)
    assert (await core.publish_prekeys(device, device, rotated, ())).one_time_prekeys == 0
    bundle = (await core.fetch_bundles("acme", "alice", [1]))[0]
    assert bundle.signed_prekey == rotated
    forged = DeviceKeys().signed_prekey(key_id=10)
    with pytest.raises(InvalidArgument, match=r"signed_prekey\.signature does not verify"):
        await core.publish_prekeys(device, device, forged, ())


async def test_a_device_publishes_and_counts_only_for_itself(core: KeyDirectory) -> None:
    account = Account()
    one = (await core.register(DeviceKeys().registration(account=account))).address
    two = (await add_device(core, account)).address
    with pytest.raises(PermissionDenied, match="acme/alice/1 may not publish"):
        await core.publish_prekeys(one, two, None, one_time_prekeys([1]))
    with pytest.raises(PermissionDenied):
        await core.count_one_time_prekeys(two, one)
    assert await core.count_one_time_prekeys(two, two) == 0


async def test_retried_registration_returns_the_same_device(core: KeyDirectory) -> None:
    keys = DeviceKeys()
    reg = keys.registration(one_time=[1, 2])
    first = await core.register(reg)
    rotated = keys.signed_prekey(key_id=2)
    await core.publish_prekeys(first.address, first.address, rotated, ())
    await core.fetch_bundles("acme", "alice", [])  # claims key 1
    assert await core.register(reg) == first
    bundle = (await core.fetch_bundles("acme", "alice", []))[0]
    # A replayed registration neither rolls back the signed prekey nor revives key 1.
    assert bundle.signed_prekey == rotated
    assert bundle.one_time_prekey == reg.one_time_prekeys[1]
    assert await core.count_one_time_prekeys(first.address, first.address) == 0


async def test_same_identity_key_with_another_dh_key_already_exists(core: KeyDirectory) -> None:
    keys, account = DeviceKeys(), Account()
    first = await core.register(keys.registration(account=account))
    keys.identity_dh_key = x25519()
    # A retry by the holder of the account key, but with another DH key.
    with pytest.raises(AlreadyExists, match="already registered as device acme/alice/1"):
        await core.register(keys.registration(account=account))
    assert await core.list_devices("acme", "alice") == (first,)


async def test_fetch_claims_one_key_per_device_then_falls_back(core: KeyDirectory) -> None:
    account = Account()
    one = await core.register(DeviceKeys().registration(one_time=[1], account=account))
    two = await add_device(core, account)  # a linked device brings no one-time keys
    bundles = await core.fetch_bundles("acme", "alice", [])
    assert [b.device for b in bundles] == [one, two]
    assert [b.one_time_prekey and b.one_time_prekey.key_id for b in bundles] == [1, None]
    again = await core.fetch_bundles("acme", "alice", [1])
    assert [(b.device, b.one_time_prekey) for b in again] == [(one, None)]
    assert again[0].signed_prekey is not None


async def test_fetch_errors(core: KeyDirectory) -> None:
    with pytest.raises(NotFound, match="user acme/nobody has no registered devices"):
        await core.fetch_bundles("acme", "nobody", [])
    await core.register(DeviceKeys().registration(one_time=[1]))
    with pytest.raises(NotFound, match="device acme/alice/2 is not registered"):
        await core.fetch_bundles("acme", "alice", [1, 2])
    with pytest.raises(InvalidArgument, match=r"devices\[1\] repeats device 1"):
        await core.fetch_bundles("acme", "alice", [1, 1])
    with pytest.raises(InvalidArgument, match=r"devices\[0\] 0 is out of range"):
        await core.fetch_bundles("acme", "alice", [0])
    with pytest.raises(InvalidArgument, match=r"request\.tenant"):
        await core.fetch_bundles("", "alice", [])
    # None of the failed fetches claimed the key.
    assert (
        await core.count_one_time_prekeys(Address("acme", "alice", 1), Address("acme", "alice", 1))
        == 1
    )


async def test_identity_key_of_unknown_device(core: KeyDirectory) -> None:
    with pytest.raises(NotFound, match="device acme/alice/1 is not registered"):
        await core.identity_key(Address("acme", "alice", 1))
    with pytest.raises(InvalidArgument, match=r"device\.device 0 is out of range"):
        await core.identity_key(Address("acme", "alice", 0))


def test_the_core_imports_no_grpc_or_protobuf() -> None:
    code = (
        "import sys, keyserver.directory, keyserver.sqlite_store;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'google', 'relaypb', 'cassandra', 'redis'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_reads_are_limited_to_the_readers_tenant(core: KeyDirectory) -> None:
    device = (await core.register(DeviceKeys().registration(one_time=[1]))).address
    stranger = Reader("zeta/mallory/1", "zeta", Address("zeta", "mallory", 1))
    for read in (
        core.fetch_bundles("acme", "alice", [], by=stranger),
        core.list_devices("acme", "alice", by=stranger),
        core.device_list("acme", "alice", by=stranger),
        core.identity_key(device, by=stranger),
    ):
        with pytest.raises(PermissionDenied, match="only callers of that tenant"):
            await read
    relay_nodes = Reader("relay nodes", None, relay_node=True)
    with pytest.raises(PermissionDenied, match="relay nodes do not fetch prekey bundles"):
        await core.fetch_bundles("acme", "alice", [], by=relay_nodes)
    # Relay nodes read every tenant's devices, lists and identity keys.
    assert [r.address for r in await core.list_devices("acme", "alice", by=relay_nodes)] == [device]
    assert (await core.device_list("acme", "alice", by=relay_nodes)).numbers() == (1,)
    assert await core.identity_key(device, by=relay_nodes) == (await core.identity_key(device))
    # A reader of the tenant may read another user of it; nothing was claimed before.
    bob = await core.device_reader(Address("acme", "bob", 1))
    [bundle] = await core.fetch_bundles("acme", "alice", [], by=bob)
    assert bundle.one_time_prekey is not None and bundle.one_time_prekey.key_id == 1


async def test_bundle_fetches_are_limited_per_requester_and_per_target(
    make_core: MakeCore, clock: FakeClock
) -> None:
    core = make_core(max_bundle_fetches_per_requester=3, max_bundle_fetches_per_target=2)
    account = Account()
    one = await core.register(DeviceKeys().registration(one_time=range(10), account=account))
    await add_device(core, account)
    bob = await core.device_reader(Address("acme", "bob", 1))
    carol = await core.device_reader(Address("acme", "carol", 1))

    async def fetch(reader: Reader, device: int) -> None:
        [bundle] = await core.fetch_bundles("acme", "alice", [device], by=reader)
        assert bundle.device.address.device == device

    await fetch(bob, 1)
    await fetch(bob, 1)
    with pytest.raises(LimitExceeded) as info:
        await fetch(bob, 1)
    assert (info.value.limit, info.value.value) == ("max_bundle_fetches_per_target", 2)
    assert f"prekey bundles of {one.address}" in info.value.message
    await fetch(bob, 2)
    with pytest.raises(LimitExceeded) as info:
        await fetch(bob, 2)
    assert (info.value.limit, info.value.value) == ("max_bundle_fetches_per_requester", 3)
    assert "max_bundle_fetches_per_requester = 3 per 60 s" in info.value.message
    # Another requester is counted apart; a fetch of every device counts each bundle.
    assert len(await core.fetch_bundles("acme", "alice", [], by=carol)) == 2
    with pytest.raises(LimitExceeded, match="max_bundle_fetches_per_requester"):
        await core.fetch_bundles("acme", "alice", [], by=carol)
    # Refused fetches claimed nothing: one key each for bob's two and carol's one.
    assert await core.count_one_time_prekeys(one.address, one.address) == 7
    clock.advance(60_000)  # the per-requester window passed, the per-target one not
    await fetch(bob, 2)
    with pytest.raises(LimitExceeded, match="max_bundle_fetches_per_target"):
        await fetch(bob, 1)
    clock.advance(3_600_000)
    await fetch(bob, 1)
    assert await core.count_one_time_prekeys(one.address, one.address) == 6
