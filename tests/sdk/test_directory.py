"""KeyDirectoryClient and device registration against the real key directory."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from relay import authproof
from relay.errors import InvalidArgument, Unauthenticated, Unavailable
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, register_device
from relay.sdk.keys import Identity, Prekey, generate_one_time_prekeys
from tests.conftest import Servers

pytestmark = pytest.mark.integration


async def test_register_publish_count_fetch(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        with DeviceState.open(tmp_path / "bob") as state:
            bob = await register_device(state, directory, "default", "bob", one_time_prekeys=2)
            assert bob == Address("default", "bob", 1) == state.address()
            identity = state.identity()
            assert identity is not None
            with pytest.raises(FileExistsError):
                await register_device(state, directory, "default", "bob")

        assert await directory.count_one_time_prekeys(identity, bob) == 2
        more = generate_one_time_prekeys(10, 3)
        rotated = Prekey.generate_signed(identity, 20)
        remaining = await directory.publish_prekeys(
            identity, bob, signed_prekey=rotated, one_time_prekeys=more
        )
        assert remaining == 5
        assert await directory.count_one_time_prekeys(identity, bob) == 5

        [bundle] = await directory.fetch_bundles("default", "bob")
        assert bundle.address == bob and bundle.identity_key == identity.public_key
        assert bundle.identity_dh_key == identity.dh_public_key
        assert bundle.signed_prekey.public == rotated.public
        assert bundle.one_time_prekey is not None
        assert authproof.verify(
            bundle.identity_key,
            bundle.signed_prekey.signature,
            authproof.signed_prekey_transcript(bundle.signed_prekey.public),
        )
        assert await directory.count_one_time_prekeys(identity, bob) == 4

        [info] = await directory.list_devices("default", "bob")
        assert info.address == bob and info.identity_key == identity.public_key
        assert await directory.list_devices("default", "nobody") == []
        assert await directory.identity_key(bob) == identity.public_key


async def test_signed_requests_need_the_device_key(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        with DeviceState.open(tmp_path) as state:
            bob = await register_device(state, directory, "default", "bob", one_time_prekeys=1)
        with pytest.raises(Unauthenticated):
            await directory.count_one_time_prekeys(Identity.generate(), bob)


async def test_bad_registration_is_rejected(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        identity = Identity.generate()
        with pytest.raises(InvalidArgument):
            await directory.register(
                identity, "Not A Tenant", "bob", Prekey.generate_signed(identity, 1)
            )
        forged = Prekey(1, b"", b"\x01" * 32, b"\x02" * 64)  # signature by nobody
        with pytest.raises((InvalidArgument, Unauthenticated)):
            await directory.register(identity, "default", "bob", forged)


async def test_unreachable_directory_names_its_address() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        directory = KeyDirectoryClient(channel, target="127.0.0.1:1", timeout=5)
        with pytest.raises(Unavailable, match=r"key directory 127\.0\.0\.1:1 is unreachable"):
            await directory.list_devices("default", "bob")
