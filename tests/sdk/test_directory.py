"""KeyDirectoryClient and device registration against the real key directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest

from relay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from relay.model import Address, registration_id
from relay.sdk import DeviceState, KeyDirectoryClient, PrekeyStatus, register_device
from relay.sdk.crypto import primitives
from relay.sdk.crypto.bundle import OneTimePrekey
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.device import remove_device
from relay.sdk.directory import _verified_bundle
from relay.sdk.keys import Identity
from relaypb.common.v1 import address_pb2
from relaypb.keys.v1 import keys_pb2
from tests.conftest import Servers
from tests.sdk.helpers import add_device, first_list

pytestmark = pytest.mark.integration


async def test_register_publish_status_fetch(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        with DeviceState.open(tmp_path / "bob") as state:
            bob = await register_device(
                state, directory, "default", "bob", one_time_prekeys=2, one_time_pq_prekeys=3
            )
            assert bob == Address("default", "bob", 1) == state.address()
            identity = state.identity()
            prekeys = state.device_prekeys()
            assert identity is not None and prekeys is not None
            assert state.unpublished_prekey_ids() == set()
            with pytest.raises(FileExistsError):
                await register_device(state, directory, "default", "bob")

        status = await directory.prekey_status(identity, bob)
        assert status == PrekeyStatus(2, 3, 10, True, True)
        assert await directory.count_one_time_prekeys(identity, bob) == 2

        prekeys.add_one_time(3, 2)
        new_ec = sorted(prekeys.one_time_ec)[2:]
        new_pq = sorted(prekeys.one_time_pq)[3:]
        rotated_id = prekeys.next_id
        prekeys.signed[rotated_id] = primitives.x25519_generate()
        rotated = prekeys.signed_prekey(rotated_id)
        status = await directory.publish_prekeys(
            identity,
            bob,
            signed_prekey=rotated,
            one_time=[_one_time(prekeys, i) for i in new_ec],
            one_time_pq=[prekeys.pq_prekey(i) for i in new_pq],
        )
        assert (status.one_time_prekeys, status.one_time_pq_prekeys) == (5, 5)

        [device] = await directory.fetch_bundles("default", "bob")
        assert device.address == bob
        assert device.registration_id == registration_id(identity.public_key)
        bundle = device.bundle
        assert bundle.identity.signing_key == identity.public_key
        assert bundle.identity.dh_key == identity.dh_public_key
        assert bundle.signed_prekey == rotated
        assert bundle.one_time_prekey is not None
        assert bundle.one_time_prekey.key_id == min(prekeys.one_time_ec)
        assert bundle.pq_prekey.key_id == min(prekeys.one_time_pq)
        assert not bundle.pq_prekey.last_resort
        bundle.verify()
        status = await directory.prekey_status(identity, bob)
        assert (status.one_time_prekeys, status.one_time_pq_prekeys) == (4, 4)

        [info] = await directory.list_devices("default", "bob")
        assert info.address == bob and info.identity_key == identity.public_key
        assert info.registration_id == registration_id(identity.public_key)
        assert await directory.list_devices("default", "nobody") == []
        assert await directory.identity_key(bob) == identity.public_key


def _one_time(prekeys: DevicePrekeys, key_id: int) -> OneTimePrekey:
    return OneTimePrekey(key_id, primitives.x25519_public(prekeys.one_time_private(key_id)))


async def test_signed_requests_need_the_device_key(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        with DeviceState.open(tmp_path) as state:
            bob = await register_device(state, directory, "default", "bob", one_time_prekeys=1)
        with pytest.raises(Unauthenticated):
            await directory.count_one_time_prekeys(Identity.generate(), bob)
        with pytest.raises(Unauthenticated):
            await directory.remove_device(
                Identity.generate(), bob, bob, first_list(Identity.generate(), "default", "bob")
            )


async def test_bad_registration_is_rejected_naming_the_key(
    servers: Servers, tmp_path: Path
) -> None:
    keys = DevicePrekeys.generate(Identity.generate(), 1, 2)
    identity, other = keys.identity, DevicePrekeys.generate(Identity.generate(), 0, 1)
    good: dict[str, Any] = {
        "signed_prekey": keys.signed_prekey(max(keys.signed)),
        "one_time": [],
        "last_resort_pq": keys.pq_prekey(max(keys.last_resort)),
        "one_time_pq": [keys.pq_prekey(i) for i in sorted(keys.one_time_pq)],
        "device_list": first_list(identity, "default", "bob"),
    }
    forged_pq = dataclasses.replace(
        good["one_time_pq"][1], signature=other.pq_prekey(min(other.one_time_pq)).signature
    )
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        with pytest.raises(InvalidArgument, match=r"request\.tenant"):
            await directory.register(identity, "Not A Tenant", "bob", **good)
        with pytest.raises(InvalidArgument, match=r"device_list\.signature does not verify"):
            forged = dataclasses.replace(good["device_list"], signature=b"\x02" * 64)
            await directory.register(identity, "default", "bob", **{**good, "device_list": forged})
        cases = {
            "signed_prekey": (
                dataclasses.replace(good["signed_prekey"], signature=b"\x02" * 64),
                "signed_prekey.signature does not verify",
            ),
            "last_resort_pq": (
                dataclasses.replace(good["last_resort_pq"], signature=b"\x02" * 64),
                f"last_resort_pq_prekey (key_id {max(keys.last_resort)}): signature does not",
            ),
            "one_time_pq": (
                [good["one_time_pq"][0], forged_pq],
                f"one_time_pq_prekeys[1] (key_id {forged_pq.key_id}): signature does not verify",
            ),
        }
        for name, (bad, message) in cases.items():
            with pytest.raises(InvalidArgument) as raised:
                await directory.register(identity, "default", "bob", **{**good, name: bad})
            assert message in raised.value.message, name
        assert await directory.register(identity, "default", "bob", **good) == Address(
            "default", "bob", 1
        )


async def test_fetched_bundles_are_verified_naming_device_and_key() -> None:
    keys = DevicePrekeys.generate(Identity.generate(), 1, 1)
    bundle = keys.bundle()
    ik = keys.identity.public_key
    msg = keys_pb2.PrekeyBundle(
        address=address_pb2.Address(tenant="default", user="bob", device=3),
        identity_key=ik,
        identity_dh_key=bundle.identity.dh_key,
        identity_dh_signature=bundle.identity.dh_signature,
        signed_prekey=keys_pb2.SignedPrekey(
            key_id=bundle.signed_prekey.key_id,
            public_key=bundle.signed_prekey.public,
            signature=bundle.signed_prekey.signature,
        ),
        pq_prekey=keys_pb2.PqPrekey(
            key_id=bundle.pq_prekey.key_id,
            public_key=bundle.pq_prekey.public,
            signature=bundle.pq_prekey.signature,
        ),
        registration_id=registration_id(ik),
    )
    assert _verified_bundle(msg).bundle.pq_prekey == bundle.pq_prekey
    for path, key in (
        ("identity_dh_signature", "identity DH key"),
        ("signed_prekey.signature", "signed prekey"),
        ("pq_prekey.signature", "one-time PQ prekey"),
    ):
        bad = keys_pb2.PrekeyBundle()
        bad.CopyFrom(msg)
        holder: Any = bad
        *parents, leaf = path.split(".")
        for parent in parents:
            holder = getattr(holder, parent)
        setattr(holder, leaf, bytes(64))
        with pytest.raises(Unauthenticated) as raised:
            _verified_bundle(bad)
        assert raised.value.message == f"prekey bundle of default/bob/3: bad signature on the {key}"
    last_resort = keys_pb2.PrekeyBundle()
    last_resort.CopyFrom(msg)
    last_resort.pq_prekey_last_resort = True
    last_resort.pq_prekey.signature = bytes(64)
    with pytest.raises(Unauthenticated, match="bad signature on the last-resort PQ prekey"):
        _verified_bundle(last_resort)
    wrong_id = keys_pb2.PrekeyBundle()
    wrong_id.CopyFrom(msg)
    wrong_id.registration_id ^= 1
    with pytest.raises(Unauthenticated, match=r"registration_id .* does not match"):
        _verified_bundle(wrong_id)


async def test_remove_device_self_and_sibling(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        homes = {name: DeviceState.open(tmp_path / name) for name in ("a1", "a2", "a3", "b1")}
        try:
            addresses = {
                name: await add_device(servers.keys_address, state, name[0], one_time_prekeys=1)
                for name, state in homes.items()
            }
            a1, a2, a3, b1 = (addresses[n] for n in ("a1", "a2", "a3", "b1"))
            assert [a1.device, a2.device, a3.device] == [1, 2, 3]
            id_a1, id_a2, id_b1 = (
                homes["a1"].identity(),
                homes["a2"].identity(),
                homes["b1"].identity(),
            )
            assert id_a1 and id_a2 and id_b1
            a_list = await _signed_in(directory, id_a1, a1).device_list("default", "a")
            with pytest.raises(PermissionDenied):  # another user's device, a list it cannot sign
                await directory.remove_device(id_b1, b1, a2, a_list)
            await remove_device(homes["a1"], directory, a2.device)  # a sibling
            await remove_device(homes["a3"], directory, a3.device)  # itself
            with pytest.raises(FailedPrecondition, match="not in the user's device list"):
                await remove_device(homes["a1"], directory, a2.device)  # gone already
            reader = _signed_in(directory, id_a1, a1)
            listed = await reader.list_devices("default", "a")
            assert [d.address for d in listed] == [a1]
            assert [b.address for b in await reader.fetch_bundles("default", "a")] == [a1]
            signed = await reader.device_list("default", "a")
            assert signed.numbers() == (1,) and signed.version == 5 and signed.verifies()
            for gone in (a2, a3):
                with pytest.raises(NotFound):
                    await reader.identity_key(gone)
                with pytest.raises(NotFound):
                    await reader.fetch_bundles("default", "a", [gone.device])
            with pytest.raises(Unauthenticated, match="not registered"):
                await directory.prekey_status(id_a2, a2)  # a removed device signs nothing
            with DeviceState.open(tmp_path / "a4") as state:
                again = await add_device(servers.keys_address, state, "a")
            assert again == Address("default", "a", 4)  # 3 (and 2) are never given out again
        finally:
            for state in homes.values():
                state.close()


def _signed_in(
    directory: KeyDirectoryClient, identity: Identity, device: Address
) -> KeyDirectoryClient:
    directory.sign_as(identity, device)
    return directory


async def test_unreachable_directory_names_its_address() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        directory = KeyDirectoryClient(channel, target="127.0.0.1:1", timeout=5)
        with pytest.raises(Unavailable, match=r"key directory 127\.0\.0\.1:1 is unreachable"):
            await directory.list_devices("default", "bob")
