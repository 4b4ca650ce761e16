"""The key directory core and PQ prekeys: signatures on upload, handout, low-water signal."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keyserver.directory import DirectoryLimits, KeyDirectory
from keyserver.model import PqPrekey, PrekeyStatus
from keyserver.sqlite_store import SCHEMA, sqlite_key_stores
from relay import authproof
from relay.clock import FakeClock
from relay.common.sqlite_worker import SqliteWorker
from relay.errors import AlreadyExists, FailedPrecondition, InvalidArgument, LimitExceeded
from relay.model import Address, registration_id
from relay.sdk.crypto import primitives
from tests.keyserver.conftest import MakeCore
from tests.keyserver.keys import Account, DeviceKeys, add_device, mlkem1024, one_time_prekeys

ALICE1 = Address("acme", "alice", 1)


def _forged(keys: DeviceKeys, prekey: PqPrekey) -> PqPrekey:
    """``prekey`` with the signature of another device over the same transcript."""
    return replace(
        prekey, signature=DeviceKeys().sign(authproof.pq_prekey_transcript(prekey.public_key))
    )


def test_the_pq_transcript_is_shared_with_the_sdk() -> None:
    key = mlkem1024()
    assert authproof.KEM_TYPE_MLKEM1024 == primitives.KEM_TYPE_MLKEM1024
    expected = (
        len(authproof.PQ_PREKEY_LABEL).to_bytes(4, "big")
        + authproof.PQ_PREKEY_LABEL
        + (1 + len(key)).to_bytes(4, "big")
        + primitives.encode_kem(key)
    )
    assert authproof.pq_prekey_transcript(key) == expected
    from relay.sdk.crypto import bundle

    assert bundle.pq_prekey_transcript is authproof.pq_prekey_transcript


def _bad_pq_registrations(keys: DeviceKeys) -> dict[str, tuple[dict[str, Any], str]]:
    good = keys.registration(one_time_pq=[7, 8, 9])
    lr = good.last_resort_pq_prekey
    assert lr is not None
    otpq = good.one_time_pq_prekeys
    return {
        "no last resort": ({"last_resort_pq_prekey": None}, "last_resort_pq_prekey is required"),
        "last resort by another key": (
            {"last_resort_pq_prekey": _forged(keys, lr)},
            "last_resort_pq_prekey (key_id 1000000): signature does not verify with identity_key",
        ),
        "last resort signed as a signed prekey": (
            {
                "last_resort_pq_prekey": replace(
                    lr, signature=keys.sign(authproof.signed_prekey_transcript(lr.public_key))
                )
            },
            "last_resort_pq_prekey (key_id 1000000): signature does not verify",
        ),
        "last resort short": (
            {"last_resort_pq_prekey": replace(lr, public_key=lr.public_key[:32])},
            "last_resort_pq_prekey (key_id 1000000): public_key must be 1568 bytes, got 32",
        ),
        "last resort signature short": (
            {"last_resort_pq_prekey": replace(lr, signature=lr.signature[:10])},
            "last_resort_pq_prekey (key_id 1000000): signature must be 64 bytes, got 10",
        ),
        "last resort key id": (
            {"last_resort_pq_prekey": replace(lr, key_id=2**32)},
            "last_resort_pq_prekey.key_id 4294967296 is out of range",
        ),
        **{
            f"one-time PQ {i} by another key": (
                {
                    "one_time_pq_prekeys": tuple(
                        _forged(keys, k) if j == i else k for j, k in enumerate(otpq)
                    )
                },
                f"one_time_pq_prekeys[{i}] (key_id {7 + i}): signature does not verify with "
                "identity_key",
            )
            for i in range(3)
        },
        "one-time PQ signature over another key": (
            {
                "one_time_pq_prekeys": (
                    otpq[0],
                    replace(otpq[1], signature=otpq[2].signature),
                    otpq[2],
                )
            },
            "one_time_pq_prekeys[1] (key_id 8): signature does not verify",
        ),
        "one-time PQ key id twice": (
            {"one_time_pq_prekeys": (otpq[0], replace(otpq[1], key_id=7))},
            "one_time_pq_prekeys[1].key_id 7 repeats an earlier key_id",
        ),
        "one-time PQ not an ML-KEM key": (
            {"one_time_pq_prekeys": (_signed_pq(keys, 5, b"\xff" * 1568),)},
            "one_time_pq_prekeys[0] (key_id 5): public_key is not a valid ML-KEM-1024 key",
        ),
    }


def _signed_pq(keys: DeviceKeys, key_id: int, public: bytes) -> PqPrekey:
    return PqPrekey(key_id, public, keys.sign(authproof.pq_prekey_transcript(public)))


PQ_CASES = sorted(_bad_pq_registrations(DeviceKeys()))


@pytest.mark.parametrize("case", PQ_CASES)
async def test_bad_pq_registration_is_rejected_naming_the_key(
    core: KeyDirectory, case: str
) -> None:
    keys = DeviceKeys()
    changes, message = _bad_pq_registrations(keys)[case]
    with pytest.raises(InvalidArgument) as info:
        await core.register(replace(keys.registration(one_time_pq=[7, 8, 9]), **changes))
    assert message in info.value.message
    assert await core.list_devices("acme", "alice") == ()


@pytest.mark.parametrize("case", [c for c in PQ_CASES if c != "no last resort"])
async def test_bad_pq_publish_is_rejected_naming_the_key(core: KeyDirectory, case: str) -> None:
    keys = DeviceKeys()
    device = (await core.register(keys.registration(one_time=[1], one_time_pq=[1]))).address
    changes, message = _bad_pq_registrations(keys)[case]
    before = await core.prekey_status(device, device)
    with pytest.raises(InvalidArgument) as info:
        await core.publish_prekeys(
            device,
            device,
            keys.signed_prekey(key_id=2),
            one_time_prekeys([50, 51]),
            last_resort_pq_prekey=changes.get("last_resort_pq_prekey"),
            one_time_pq_prekeys=changes.get("one_time_pq_prekeys", ()),
        )
    assert message in info.value.message
    # Nothing of the refused request was stored: no key, no rotation.
    assert await core.prekey_status(device, device) == before
    [bundle] = await core.fetch_bundles("acme", "alice", [])
    assert bundle.signed_prekey is not None and bundle.signed_prekey.key_id == 1


async def test_publish_checks_every_signed_key(core: KeyDirectory) -> None:
    keys = DeviceKeys()
    device = (await core.register(keys.registration())).address
    forged_spk = replace(keys.signed_prekey(key_id=2), signature=DeviceKeys().sign(b"x"))
    with pytest.raises(InvalidArgument, match=r"^signed_prekey\.signature does not verify"):
        await core.publish_prekeys(device, device, forged_spk, ())
    status = await core.publish_prekeys(
        device,
        device,
        keys.signed_prekey(key_id=2),
        one_time_prekeys([1, 2]),
        last_resort_pq_prekey=keys.pq_prekey(key_id=77),
        one_time_pq_prekeys=keys.pq_prekeys([3, 4, 5]),
    )
    assert status == PrekeyStatus(2, 3, 10, True, True)
    [bundle] = await core.fetch_bundles("acme", "alice", [])
    assert bundle.signed_prekey is not None and bundle.signed_prekey.key_id == 2
    assert bundle.pq_prekey is not None and bundle.pq_prekey.key_id == 3


async def test_pq_limits_are_named(make_core: MakeCore) -> None:
    core = make_core(max_one_time_pq_prekeys_per_request=3, max_one_time_pq_prekeys=4)
    keys = DeviceKeys()
    with pytest.raises(LimitExceeded) as info:
        await core.register(keys.registration(one_time_pq=range(4)))
    assert (info.value.limit, info.value.value) == ("max_one_time_pq_prekeys_per_request", 3)
    assert "max_one_time_pq_prekeys_per_request = 3" in info.value.message
    device = (await core.register(keys.registration(one_time_pq=range(3)))).address
    with pytest.raises(LimitExceeded) as info:
        await core.publish_prekeys(
            device,
            device,
            keys.signed_prekey(key_id=2),
            (),
            last_resort_pq_prekey=keys.pq_prekey(key_id=90),
            one_time_pq_prekeys=keys.pq_prekeys([10, 11]),
        )
    assert (info.value.limit, info.value.value) == ("max_one_time_pq_prekeys", 4)
    assert "max_one_time_pq_prekeys = 4" in info.value.message
    status = await core.prekey_status(device, device)
    assert status.one_time_pq_prekeys == 3
    # The refused request replaced neither signed key.
    [bundle] = await core.fetch_bundles("acme", "alice", [])
    assert bundle.signed_prekey is not None and bundle.signed_prekey.key_id == 1


async def test_fetch_hands_out_pq_keys_once_then_the_last_resort(core: KeyDirectory) -> None:
    keys = DeviceKeys()
    reg = keys.registration(one_time=[1], one_time_pq=[5, 6])
    record = await core.register(reg)
    assert reg.last_resort_pq_prekey is not None
    got = [(await core.fetch_bundles("acme", "alice", []))[0] for _ in range(4)]
    assert [b.pq_prekey for b in got] == [
        reg.one_time_pq_prekeys[0],
        reg.one_time_pq_prekeys[1],
        reg.last_resort_pq_prekey,
        reg.last_resort_pq_prekey,
    ]
    assert [b.pq_last_resort for b in got] == [False, False, True, True]
    assert [b.one_time_prekey is not None for b in got] == [True, False, False, False]
    assert all(b.device.registration_id == registration_id(keys.identity_key) for b in got)
    assert record.registration_id == registration_id(keys.identity_key)


async def test_concurrent_fetches_hand_out_each_pq_key_once(core: KeyDirectory) -> None:
    keys = DeviceKeys()
    await core.register(keys.registration(one_time=range(10), one_time_pq=range(15)))
    got = await asyncio.gather(*(core.fetch_bundles("acme", "alice", []) for _ in range(40)))
    bundles = [b for [b] in got]
    pq = [b.pq_prekey.key_id for b in bundles if b.pq_prekey and not b.pq_last_resort]
    ec = [b.one_time_prekey.key_id for b in bundles if b.one_time_prekey]
    assert sorted(pq) == list(range(15))
    assert sorted(ec) == list(range(10))
    assert sum(b.pq_last_resort for b in bundles) == 25


async def test_replenish_is_signalled_at_the_low_water_mark(make_core: MakeCore) -> None:
    core = make_core(low_water_mark=2)
    keys = DeviceKeys()
    device = (
        await core.register(keys.registration(one_time=range(4), one_time_pq=range(3)))
    ).address
    assert await core.prekey_status(device, device) == PrekeyStatus(4, 3, 2, False, True)
    await core.fetch_bundles("acme", "alice", [])  # 3 EC, 2 PQ: the PQ pool is at the mark
    assert await core.prekey_status(device, device) == PrekeyStatus(3, 2, 2, True, True)
    status = await core.publish_prekeys(
        device, device, None, (), one_time_pq_prekeys=keys.pq_prekeys([20])
    )
    assert status == PrekeyStatus(3, 3, 2, False, True)
    await core.fetch_bundles("acme", "alice", [])  # 2 EC: the X25519 pool is at the mark
    assert (await core.prekey_status(device, device)).replenish
    assert await core.count_one_time_prekeys(device, device) == 2


async def test_a_missing_last_resort_key_asks_for_replenish(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with SqliteWorker(tmp_path / "legacy.db", SCHEMA) as worker:
        stores = sqlite_key_stores(worker)
        core = KeyDirectory(stores, clock, DirectoryLimits(low_water_mark=0))
        keys = DeviceKeys()
        device = (await core.register(keys.registration(one_time=[1], one_time_pq=[1]))).address
        assert not (await core.prekey_status(device, device)).replenish
        # A device registered before PQXDH has no PQ key: written to the stores directly.
        old = DeviceKeys()
        record = await stores.devices.register(
            "acme",
            "alice",
            identity_key=old.identity_key,
            identity_dh_key=old.identity_dh_key,
            identity_dh_signature=old.sign(authproof.identity_dh_transcript(old.identity_dh_key)),
            registered_at_ms=1,
        )
        legacy = record.address
        await stores.prekeys.set_signed_prekey(legacy, old.signed_prekey())
        await stores.prekeys.add_one_time_prekeys(legacy, one_time_prekeys([4]), 10)
        assert await core.prekey_status(legacy, legacy) == PrekeyStatus(1, 0, 0, True, False)
        [bundle] = await core.fetch_bundles("acme", "alice", [legacy.device])
        assert bundle.pq_prekey is None  # nothing usable (the SDK refuses it by name) ...
        assert await core.count_one_time_prekeys(legacy, legacy) == 1  # ... and nothing spent
        status = await core.publish_prekeys(
            legacy, legacy, None, (), last_resort_pq_prekey=old.pq_prekey(key_id=3)
        )
        assert status == PrekeyStatus(1, 0, 0, True, True)  # an empty pool is at mark 0
        [bundle] = await core.fetch_bundles("acme", "alice", [legacy.device])
        assert bundle.pq_last_resort and bundle.one_time_prekey is not None


async def test_the_identity_key_of_a_removed_device_cannot_come_back(
    core: KeyDirectory,
) -> None:
    keys, account = DeviceKeys(), Account()
    reg = keys.registration(account=account)
    device = (await core.register(reg)).address
    other = (await add_device(core, account)).address
    without = account.without(device.device)
    await core.remove_device(other, device, without)
    account.commit(without)
    # Neither as the user's first device again (the user exists) ...
    with pytest.raises(AlreadyExists, match="user acme/alice exists already"):
        await core.register(reg)
    # ... nor linked anew.
    with pytest.raises(FailedPrecondition, match=r"is a device of acme/alice already \(or was\)"):
        await core.linking.request(keys.link_request())
    assert [r.address for r in await core.list_devices("acme", "alice")] == [other]
    assert (await add_device(core, account)).address.device == 3
