"""Trust on first use: pinned account keys, changed keys, new devices, forged lists."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import grpc
import pytest

from keyserver import tokens
from relay.accounts import ListedDevice, build_list
from relay.clock import SystemClock
from relay.errors import FailedPrecondition, Unauthenticated
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, register_device
from relay.sdk.accounts import (
    AccountKeyChanged,
    Accounts,
    account_public,
    generate_account_key,
    next_list,
    safety_number,
)
from relay.sdk.secure import SecureClient
from tests.accounts.conftest import TENANT_KEY, TOKEN_TENANT, overrides
from tests.conftest import Servers, StartServers
from tests.e2ee.helpers import take
from tests.sdk.helpers import add_device

pytestmark = pytest.mark.integration


def mint(user: str, purpose: str = "register") -> str:
    now = SystemClock().now_ms()
    return tokens.mint(TENANT_KEY, TOKEN_TENANT, user, now_ms=now, purpose=purpose)


async def test_a_changed_account_key_blocks_sends_until_trusted(
    srv: Servers, tmp_path: Path, user: str
) -> None:
    bob_name = f"{user}-bob"
    async with grpc.aio.insecure_channel(srv.keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        alice = DeviceState.open(tmp_path / "alice")
        old_bob = DeviceState.open(tmp_path / "bob")
        await register_device(alice, directory, TOKEN_TENANT, user, registration_token=mint(user))
        await register_device(
            old_bob, directory, TOKEN_TENANT, bob_name, registration_token=mint(bob_name)
        )
    try:
        async with SecureClient(alice, srv.relay_address, srv.keys_address) as client:
            await client.send(bob_name, b"before the reset")
            # Bob loses every device and resets his account with a token from the app.
            new_bob = DeviceState.open(tmp_path / "new-bob")
            async with grpc.aio.insecure_channel(srv.keys_address) as channel:
                await register_device(
                    new_bob,
                    KeyDirectoryClient(channel),
                    TOKEN_TENANT,
                    bob_name,
                    registration_token=mint(bob_name, "reset"),
                    reset=True,
                )
            with pytest.raises(AccountKeyChanged, match=f"relayctl trust {bob_name}"):
                await client.send(bob_name, b"to whoever holds the new key")
            # Both sides compute the same safety number from the keys they see.
            alice_key = account_public(Accounts(alice).own_private())
            new_key = account_public(Accounts(new_bob).own_private())
            seen_by_alice = safety_number(
                (f"{TOKEN_TENANT}/{user}", alice_key), (f"{TOKEN_TENANT}/{bob_name}", new_key)
            )
            seen_by_bob = safety_number(
                (f"{TOKEN_TENANT}/{bob_name}", new_key), (f"{TOKEN_TENANT}/{user}", alice_key)
            )
            assert seen_by_alice == seen_by_bob and len(seen_by_alice.split()) == 12
            old_key = account_public(Accounts(old_bob).own_private())
            assert (
                safety_number(
                    (f"{TOKEN_TENANT}/{user}", alice_key), (f"{TOKEN_TENANT}/{bob_name}", old_key)
                )
                != seen_by_alice
            )
            trusted = await client.trust(bob_name)
            assert trusted.account_key == new_key
            receipt = await client.send(bob_name, b"after trusting")
            assert receipt.devices == (Address(TOKEN_TENANT, bob_name, 2),)
        async with SecureClient(new_bob, srv.relay_address, srv.keys_address) as reader:
            [message] = await take(reader, 1)
            assert message.body == b"after trusting"
        new_bob.close()
    finally:
        alice.close()
        old_bob.close()


async def test_a_new_device_of_a_peer_is_reported(
    start_servers: StartServers, tmp_path: Path
) -> None:
    srv = await start_servers()
    alice = DeviceState.open(tmp_path / "a")
    b1 = DeviceState.open(tmp_path / "b1")
    await add_device(srv.keys_address, alice, "alice")
    await add_device(srv.keys_address, b1, "bob")
    seen: list[Address] = []
    try:
        async with SecureClient(
            alice, srv.relay_address, srv.keys_address, on_new_device=seen.append
        ) as client:
            await client.send("bob", b"one")
            assert seen == []  # the first list is pinned as it is
            with DeviceState.open(tmp_path / "b2") as b2:
                await add_device(srv.keys_address, b2, "bob")
            receipt = await client.send("bob", b"two")
            assert seen == [Address("default", "bob", 2)]
            assert set(receipt.devices) == {
                Address("default", "bob", 1),
                Address("default", "bob", 2),
            }
    finally:
        alice.close()
        b1.close()


async def test_a_device_the_directory_adds_on_its_own_gets_nothing(
    start_servers: StartServers, tmp_path: Path
) -> None:
    """The key directory operator inserts a device of its own under bob: senders refuse it."""
    srv = await start_servers()
    alice = DeviceState.open(tmp_path / "a")
    bob = DeviceState.open(tmp_path / "b")
    await add_device(srv.keys_address, alice, "alice")
    await add_device(srv.keys_address, bob, "bob")
    sealed_for: list[Address] = []
    try:
        async with SecureClient(alice, srv.relay_address, srv.keys_address) as client:
            await client.send("bob", b"one")
            keys_db = sqlite3.connect(srv.config.storage.path / "keys.db")
            with keys_db:  # a device row that no signed list names (as a rogue operator would)
                keys_db.execute(
                    "INSERT INTO devices SELECT tenant, user, 2, ?, identity_dh_key,"
                    " identity_dh_signature, registered_at_ms FROM devices"
                    " WHERE tenant = 'default' AND user = 'bob' AND device = 1",
                    (b"\x07" * 32,),
                )
            keys_db.close()
            seal = client.codec.seal

            def recording(recipient: Address, plaintext: bytes) -> bytes:
                sealed_for.append(recipient)
                return seal(recipient, plaintext)

            client.codec.seal = recording  # type: ignore[method-assign]
            with pytest.raises(FailedPrecondition, match="kept changing"):
                await client.send("bob", b"two")
        assert Address("default", "bob", 2) not in sealed_for
        assert Address("default", "bob", 1) in sealed_for
    finally:
        alice.close()
        bob.close()


def test_checks_refuse_forged_old_and_changed_lists(tmp_path: Path) -> None:
    with DeviceState.open(tmp_path) as state:
        accounts = Accounts(state)
        private = generate_account_key()
        unsigned = build_list(
            "default",
            "carol",
            0,
            1,
            [ListedDevice.of(1, b"\x05" * 32)],
            account_key=account_public(private),
        )
        first = next_list(private, unsigned, 1)  # version 1, signed
        assert accounts.check(first) == first
        extra = ListedDevice.of(2, b"\x06" * 32)
        forged = dataclasses.replace(first, devices=(*first.devices, extra))
        with pytest.raises(Unauthenticated, match="not signed by its account key"):
            accounts.check(forged)
        second = next_list(private, first, 2, add=[extra])
        accounts.check(second)
        with pytest.raises(Unauthenticated, match="older than version 2"):
            accounts.check(first)
        other = generate_account_key()
        changed = next_list(
            other, dataclasses.replace(second, account_key=account_public(other)), 3
        )
        with pytest.raises(AccountKeyChanged):
            accounts.check(changed)
        accounts.trust(changed)
        assert accounts.check(changed) == changed


async def test_messages_from_a_reset_peer_wait_unopened_until_trusted(
    start_servers: StartServers, tmp_path: Path, user: str
) -> None:
    srv = await start_servers(**overrides(tmp_path))
    bob_name = f"{user}-bob"
    alice = DeviceState.open(tmp_path / "alice")
    old_bob = DeviceState.open(tmp_path / "bob")
    new_bob = DeviceState.open(tmp_path / "new-bob")
    try:
        async with grpc.aio.insecure_channel(srv.keys_address) as channel:
            directory = KeyDirectoryClient(channel)
            await register_device(
                alice, directory, TOKEN_TENANT, user, registration_token=mint(user)
            )
            await register_device(
                old_bob, directory, TOKEN_TENANT, bob_name, registration_token=mint(bob_name)
            )
        async with SecureClient(old_bob, srv.relay_address, srv.keys_address) as client:
            await client.send(user, b"from the old bob")
        async with SecureClient(alice, srv.relay_address, srv.keys_address) as reader:
            assert [m.body for m in await take(reader, 1)] == [b"from the old bob"]
        async with grpc.aio.insecure_channel(srv.keys_address) as channel:
            await register_device(
                new_bob,
                KeyDirectoryClient(channel),
                TOKEN_TENANT,
                bob_name,
                registration_token=mint(bob_name, "reset"),
                reset=True,
            )
        async with SecureClient(new_bob, srv.relay_address, srv.keys_address) as client:
            await client.send(user, b"from the new bob")
        async with SecureClient(alice, srv.relay_address, srv.keys_address) as reader:
            await reader.wait_queue_empty()
            assert reader.relay.held_for_trust == 1 and reader.relay.undecryptable == 0
            await reader.trust(bob_name)
        # Held, not acknowledged: the next session gets it again and now opens it.
        async with SecureClient(alice, srv.relay_address, srv.keys_address) as reader:
            [message] = await take(reader, 1)
            assert message.body == b"from the new bob"
            assert message.sender == Address(TOKEN_TENANT, bob_name, 2)
    finally:
        for state in (alice, old_bob, new_bob):
            state.close()
