"""Device prekeys in the state file, registration with PQ keys, and replenish_prekeys."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from relay.errors import FailedPrecondition, Unavailable
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, PrekeyStatus, register_device
from relay.sdk.crypto import pqxdh
from relay.sdk.crypto.bundle import OneTimePrekey, PqPrekey, SignedPrekey
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.device import replenish_prekeys
from relay.sdk.keys import Identity, Prekey, generate_one_time_prekeys
from tests.conftest import Servers
from tests.sdk.helpers import first_list

BOB = Address("default", "bob", 1)


def _same(a: DevicePrekeys, b: DevicePrekeys) -> bool:
    return (a.identity.private_bytes(), a.signed, a.last_resort, a.one_time_ec, a.one_time_pq) == (
        b.identity.private_bytes(),
        b.signed,
        b.last_resort,
        b.one_time_ec,
        b.one_time_pq,
    ) and a.next_id == b.next_id


def test_device_prekeys_survive_reopen_in_a_private_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    identity = Identity.generate()
    keys = DevicePrekeys.generate(identity, one_time_ec=3, one_time_pq=2)
    old = os.umask(0o022)
    try:
        with DeviceState.open(home) as state:
            assert state.device_prekeys() is None
            state.save_identity(identity)
            assert state.device_prekeys() is None
            state.save_device_prekeys(keys, unpublished=[max(keys.one_time_pq)])
    finally:
        os.umask(old)
    for path in home.iterdir():  # device.db and its WAL companions
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    with DeviceState.open(home) as state:
        stored = state.device_prekeys()
        assert stored is not None and _same(stored, keys)
        assert len(next(iter(stored.one_time_pq.values()))) == 64  # the ML-KEM seed
        assert state.unpublished_prekey_ids() == {max(keys.one_time_pq)}
        # Consuming keys and saving deletes them; marks of kept keys stay.
        stored.consume(min(stored.one_time_pq), min(stored.one_time_ec))
        state.save_device_prekeys(stored)
        again = state.device_prekeys()
        assert again is not None and _same(again, stored)
        assert len(again.one_time_ec) == 2 and len(again.one_time_pq) == 1
        assert state.unpublished_prekey_ids() == {max(keys.one_time_pq)}
        state.mark_prekeys_published([max(keys.one_time_pq)])
        assert state.unpublished_prekey_ids() == set()
    raw = sqlite3.connect(home / "device.db")
    try:
        stored_bytes = {bytes(r[0]) for r in raw.execute("SELECT private FROM device_prekeys")}
    finally:
        raw.close()
    assert keys.one_time_ec[min(keys.one_time_ec)] not in stored_bytes  # consumed: gone


def _old_state(home: Path) -> tuple[Identity, Prekey, list[Prekey]]:
    """A state file as the release before PQXDH wrote it."""
    identity = Identity.generate()
    signed = Prekey.generate_signed(identity, 1)
    one_time = generate_one_time_prekeys(2, 3)
    with DeviceState.open(home) as state:
        state.save_identity(identity, [signed, *one_time])
    return identity, signed, one_time


def test_an_old_state_file_is_converted_on_first_use(tmp_path: Path) -> None:
    identity, signed, one_time = _old_state(tmp_path)
    with DeviceState.open(tmp_path) as state:
        keys = state.device_prekeys()
        assert keys is not None
        assert keys.identity.private_bytes() == identity.private_bytes()
        assert keys.signed == {1: signed.private}
        assert keys.one_time_ec == {p.key_id: p.private for p in one_time}
        assert keys.last_resort == {} and keys.one_time_pq == {}
        assert keys.next_id == 5
        # The published form is what the old release uploaded (same key and signature).
        assert keys.signed_prekey(1) == SignedPrekey(1, signed.public, signed.signature)
        assert state.prekeys() == []  # the old table no longer holds any private key
        again = state.device_prekeys()
        assert again is not None and _same(again, keys)


def test_device_prekeys_need_an_identity(tmp_path: Path) -> None:
    with DeviceState.open(tmp_path) as state:
        assert state.device_prekeys() is None


# -- against a real key directory ------------------------------------------------------


@pytest.fixture
async def directory(servers: Servers) -> AsyncIterator[KeyDirectoryClient]:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        yield KeyDirectoryClient(channel)


class FailingPublish(KeyDirectoryClient):
    """The real client, except that the next ``failures`` uploads fail as an outage would."""

    def __init__(self, channel: grpc.aio.Channel, failures: int) -> None:
        super().__init__(channel)
        self.failures = failures
        self.publishes = 0

    async def publish_prekeys(
        self,
        identity: Identity,
        device: Address,
        *,
        signed_prekey: SignedPrekey | None = None,
        one_time: Sequence[OneTimePrekey] = (),
        last_resort_pq: PqPrekey | None = None,
        one_time_pq: Sequence[PqPrekey] = (),
    ) -> PrekeyStatus:
        self.publishes += 1
        if self.failures:
            self.failures -= 1
            raise Unavailable("key directory is unreachable (test)")
        return await super().publish_prekeys(
            identity,
            device,
            signed_prekey=signed_prekey,
            one_time=one_time,
            last_resort_pq=last_resort_pq,
            one_time_pq=one_time_pq,
        )


def _ids(keys: DevicePrekeys | None) -> set[int]:
    assert keys is not None
    return {*keys.signed, *keys.last_resort, *keys.one_time_ec, *keys.one_time_pq}


@pytest.mark.integration
async def test_replenish_refills_both_pools_then_does_nothing(
    servers: Servers, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = FailingPublish(channel, failures=0)
        with DeviceState.open(tmp_path) as state:
            bob = await register_device(
                state, directory, "default", "bob", one_time_prekeys=12, one_time_pq_prekeys=11
            )
            identity = state.identity()
            assert identity is not None
            full = PrekeyStatus(12, 11, 10, False, True)
            assert await directory.prekey_status(identity, bob) == full
            before = _ids(state.device_prekeys())
            targets = {"one_time_prekeys": 12, "one_time_pq_prekeys": 11}
            assert await replenish_prekeys(state, directory, **targets) == full
            assert _ids(state.device_prekeys()) == before and directory.publishes == 0

            await directory.fetch_bundles("default", "bob")  # 11 and 10: the PQ pool is low
            low = await directory.prekey_status(identity, bob)
            assert low == PrekeyStatus(11, 10, 10, True, True)
            refilled = await replenish_prekeys(state, directory, low, **targets)
            assert refilled == full
            assert directory.publishes == 1
            new = _ids(state.device_prekeys()) - before
            assert len(new) == 2  # one of each pool, nothing else
            assert state.unpublished_prekey_ids() == set()
            assert await replenish_prekeys(state, directory, **targets) == full
            assert directory.publishes == 1


@pytest.mark.integration
async def test_replenish_to_the_default_targets(
    directory: KeyDirectoryClient, tmp_path: Path
) -> None:
    with DeviceState.open(tmp_path) as state:
        bob = await register_device(
            state, directory, "default", "bob", one_time_prekeys=3, one_time_pq_prekeys=0
        )
        status = await replenish_prekeys(state, directory)
        assert status == PrekeyStatus(100, 100, 10, False, True)
        keys = state.device_prekeys()
        assert keys is not None and (len(keys.one_time_ec), len(keys.one_time_pq)) == (100, 100)
        assert bob == state.address()


@pytest.mark.integration
async def test_a_failed_upload_is_sent_again_not_replaced(servers: Servers, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(servers.keys_address) as channel:
        directory = FailingPublish(channel, failures=1)
        with DeviceState.open(tmp_path) as state:
            bob = await register_device(
                state, directory, "default", "bob", one_time_prekeys=2, one_time_pq_prekeys=2
            )
            identity = state.identity()
            assert identity is not None
            targets = {"one_time_prekeys": 20, "one_time_pq_prekeys": 20}
            with pytest.raises(Unavailable):
                await replenish_prekeys(state, directory, **targets)
            pending = state.unpublished_prekey_ids()
            assert len(pending) == 36  # 18 + 18, private halves stored before the upload
            stored = state.device_prekeys()
            assert stored is not None and pending <= _ids(stored)
            assert await directory.prekey_status(identity, bob) == PrekeyStatus(
                2, 2, 10, True, True
            )
            status = await replenish_prekeys(state, directory, **targets)
            assert status == PrekeyStatus(20, 20, 10, False, True)
            assert state.unpublished_prekey_ids() == set()
            assert _ids(state.device_prekeys()) == _ids(stored)  # the same keys, none new
            # A session set up on a replenished key works with the stored private keys.
            for _ in range(2):
                await directory.fetch_bundles("default", "bob")
            [device] = await directory.fetch_bundles("default", "bob")
            assert device.bundle.pq_prekey.key_id in pending
            initiation = pqxdh.initiate(Identity.generate(), device.bundle)
            keys = state.device_prekeys()
            assert keys is not None
            assert pqxdh.respond(keys, initiation.message) == (
                initiation.shared_secret,
                initiation.associated_data,
            )


@pytest.mark.integration
async def test_more_one_time_keys_than_one_request_holds(
    directory: KeyDirectoryClient, tmp_path: Path
) -> None:
    with DeviceState.open(tmp_path) as state:
        bob = await register_device(
            state, directory, "default", "bob", one_time_prekeys=230, one_time_pq_prekeys=101
        )
        identity = state.identity()
        assert identity is not None
        status = await directory.prekey_status(identity, bob)
        assert (status.one_time_prekeys, status.one_time_pq_prekeys) == (230, 101)
        assert state.unpublished_prekey_ids() == set()


@pytest.mark.integration
async def test_an_old_unregistered_state_registers_with_pq_keys(
    directory: KeyDirectoryClient, tmp_path: Path
) -> None:
    identity, signed, _ = _old_state(tmp_path)
    with DeviceState.open(tmp_path) as state:
        bob = await register_device(state, directory, "default", "bob")
        assert bob == BOB
        [device] = await directory.fetch_bundles("default", "bob")
    assert device.bundle.signed_prekey.public == signed.public
    assert device.bundle.one_time_prekey is not None
    assert device.bundle.one_time_prekey.key_id == 2  # the old release's first one-time key
    assert device.bundle.pq_prekey.last_resort  # made on conversion; no one-time PQ keys
    assert device.bundle.identity.signing_key == identity.public_key


@pytest.mark.integration
async def test_an_old_registered_device_gets_its_pq_keys_from_replenish(
    servers: Servers, directory: KeyDirectoryClient, tmp_path: Path
) -> None:
    identity, signed, one_time = _old_state(tmp_path)
    # As registered by the old release: its X25519 keys, no PQ key on the directory.
    throwaway = DevicePrekeys.generate(identity, 0, 0)
    bob = await directory.register(
        identity,
        "default",
        "bob",
        signed_prekey=SignedPrekey(1, signed.public, signed.signature),
        one_time=[OneTimePrekey(p.key_id, p.public) for p in one_time],
        last_resort_pq=throwaway.pq_prekey(max(throwaway.last_resort)),
        device_list=first_list(identity, "default", "bob"),
    )
    keys_db = sqlite3.connect(servers.config.storage.path / "keys.db")
    try:
        with keys_db:
            keys_db.execute("DELETE FROM last_resort_pq_prekeys")
    finally:
        keys_db.close()
    with DeviceState.open(tmp_path) as state:
        state.save_address(bob)
        status = await directory.prekey_status(identity, bob)
        assert status == PrekeyStatus(3, 0, 10, True, False)
        targets = {"one_time_prekeys": 10, "one_time_pq_prekeys": 5}
        status = await replenish_prekeys(state, directory, status, **targets)
        assert status == PrekeyStatus(10, 5, 10, True, True)  # 10 <= 10: still asks, by design
        keys = state.device_prekeys()
        assert keys is not None and len(keys.last_resort) == 1
        assert state.unpublished_prekey_ids() == set()
        for _ in range(5):
            await directory.fetch_bundles("default", "bob")
        [device] = await directory.fetch_bundles("default", "bob")
        assert device.bundle.pq_prekey.last_resort
        assert device.bundle.pq_prekey.key_id in keys.last_resort
        initiation = pqxdh.initiate(Identity.generate(), device.bundle)
        assert pqxdh.respond(keys, initiation.message)[0] == initiation.shared_secret


async def test_replenish_needs_a_registered_device(
    directory: KeyDirectoryClient, tmp_path: Path
) -> None:
    with (
        DeviceState.open(tmp_path) as state,
        pytest.raises(FailedPrecondition, match="holds no registered device"),
    ):
        await replenish_prekeys(state, directory)
