"""Conformance suites for the protocols of ``keyserver.ports``, one class each.

Run against every backend: a backend's test module subclasses the suites and provides
an ``open_stores`` fixture, a factory whose every call opens (as an async context
manager) a ``Stores`` on the same, initially empty, backing storage (one SQLite file,
one Cassandra keyspace). Opening it twice at once stands for two processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from keyserver.model import (
    AccountState,
    DeviceRecord,
    LinkApproval,
    NewDevice,
    OneTimePrekey,
    PendingLink,
    PqPrekey,
    SignedPrekey,
)
from keyserver.ports import DeviceDirectory, KeyStores
from relay.accounts import DeviceList, ListedDevice, build_list
from relay.model import Address

NOW = 1_700_000_000_000
BIG = 1_000_000
DEV = Address("acme", "alice", 1)
OTHER = Address("acme", "alice", 2)


Stores = KeyStores


OpenStores = Callable[[], AbstractAsyncContextManager[Stores]]


def otks(*key_ids: int) -> list[OneTimePrekey]:
    return [OneTimePrekey(i, os.urandom(32)) for i in key_ids]


def spk(key_id: int = 1) -> SignedPrekey:
    return SignedPrekey(key_id, os.urandom(32), os.urandom(64))


def pqks(*key_ids: int) -> list[PqPrekey]:
    """PQ prekeys with random bytes (stores do not check keys; the core does)."""
    return [PqPrekey(i, os.urandom(1568), os.urandom(64)) for i in key_ids]


async def register(
    devices: DeviceDirectory,
    tenant: str = "acme",
    user: str = "alice",
    identity_key: bytes | None = None,
    at: int = NOW,
) -> DeviceRecord:
    return await devices.register(
        tenant,
        user,
        identity_key=identity_key or os.urandom(32),
        identity_dh_key=os.urandom(32),
        identity_dh_signature=os.urandom(64),
        registered_at_ms=at,
    )


def new_device(identity_key: bytes | None = None, at: int = NOW) -> NewDevice:
    return NewDevice(identity_key or os.urandom(32), os.urandom(32), os.urandom(64), at)


def device_list(
    version: int,
    devices: dict[int, bytes],
    *,
    user: str = "alice",
    account_key: bytes | None = None,
    at: int = NOW,
) -> DeviceList:
    """A list of ``devices`` (number -> identity key) with a random signature.

    Stores do not verify signatures (the core does), so random bytes do.
    """
    listed = build_list(
        "acme",
        user,
        version,
        at,
        [ListedDevice.of(n, key) for n, key in devices.items()],
        account_key=account_key or ACCOUNT_KEY,
    )
    return dataclasses.replace(listed, signature=os.urandom(64))


ACCOUNT_KEY = os.urandom(32)


class _StoresFixture:
    @pytest.fixture
    async def stores(self, open_stores: OpenStores) -> AsyncIterator[Stores]:
        async with open_stores() as stores:
            yield stores


class DeviceDirectoryConformance(_StoresFixture):
    async def test_device_numbers_count_from_one_per_user(self, stores: Stores) -> None:
        numbers = [(await register(stores.devices)).address.device for _ in range(3)]
        assert numbers == [1, 2, 3]
        assert (await register(stores.devices, user="bob")).address == Address("acme", "bob", 1)
        other_tenant = await register(stores.devices, tenant="zeta")
        assert other_tenant.address == Address("zeta", "alice", 1)

    async def test_get_returns_the_registered_record(self, stores: Stores) -> None:
        record = await register(stores.devices, at=NOW + 5)
        assert record.registered_at_ms == NOW + 5
        assert await stores.devices.get(record.address) == record
        assert await stores.devices.get(Address("acme", "alice", 2)) is None
        assert await stores.devices.get(Address("acme", "bob", 1)) is None
        assert await stores.devices.get(Address("zeta", "alice", 1)) is None

    async def test_list_is_in_device_order(self, stores: Stores) -> None:
        assert await stores.devices.list("acme", "alice") == ()
        records = [await register(stores.devices) for _ in range(4)]
        await register(stores.devices, user="bob")
        assert await stores.devices.list("acme", "alice") == tuple(records)

    async def test_concurrent_registrations_get_distinct_numbers(self, stores: Stores) -> None:
        records = await asyncio.gather(*(register(stores.devices) for _ in range(30)))
        assert sorted(r.address.device for r in records) == list(range(1, 31))
        assert len(await stores.devices.list("acme", "alice")) == 30

    async def test_same_identity_key_returns_the_existing_device(self, stores: Stores) -> None:
        key = os.urandom(32)
        first = await register(stores.devices, identity_key=key, at=NOW)
        again = await register(stores.devices, identity_key=key, at=NOW + 1000)
        assert again == first
        assert await stores.devices.list("acme", "alice") == (first,)
        elsewhere = await register(stores.devices, user="bob", identity_key=key)
        assert elsewhere.address == Address("acme", "bob", 1)

    async def test_a_removed_device_is_gone_but_keeps_its_number(self, stores: Stores) -> None:
        one, two, three = [await register(stores.devices) for _ in range(3)]
        assert await stores.devices.remove(three.address, NOW + 7)
        assert not await stores.devices.remove(three.address, NOW + 8)  # removed already
        assert not await stores.devices.remove(Address("acme", "alice", 9), NOW)  # unknown
        assert not await stores.devices.remove(Address("acme", "nobody", 1), NOW)
        assert await stores.devices.get(three.address) is None
        assert await stores.devices.list("acme", "alice") == (one, two)
        # Its number is never given out again, though it was the highest.
        assert (await register(stores.devices)).address.device == 4
        # Its identity key still names it, marked removed (a retried registration).
        again = await register(stores.devices, identity_key=three.identity_key)
        assert again.address == three.address
        assert again.removed_at_ms == NOW + 7
        assert await stores.devices.get(two.address) == two
        assert (await register(stores.devices, user="bob")).address.device == 1

    async def test_concurrent_removals_remove_once(self, stores: Stores) -> None:
        record = await register(stores.devices)
        results = await asyncio.gather(
            *(stores.devices.remove(record.address, NOW + i) for i in range(10))
        )
        assert sorted(results) == [False] * 9 + [True]
        assert await stores.devices.list("acme", "alice") == ()

    async def test_devices_survive_reopening(self, open_stores: OpenStores) -> None:
        async with open_stores() as stores:
            record = await register(stores.devices)
        async with open_stores() as stores:
            assert await stores.devices.get(record.address) == record
            assert (await register(stores.devices)).address.device == 2


class PrekeyStoreConformance(_StoresFixture):
    async def test_signed_prekey_is_set_and_replaced(self, stores: Stores) -> None:
        assert await stores.prekeys.signed_prekey(DEV) is None
        first, second = spk(1), spk(2)
        await stores.prekeys.set_signed_prekey(DEV, first)
        assert await stores.prekeys.signed_prekey(DEV) == first
        await stores.prekeys.set_signed_prekey(DEV, second)
        assert await stores.prekeys.signed_prekey(DEV) == second
        assert await stores.prekeys.signed_prekey(OTHER) is None

    async def test_claims_lowest_key_id_first(self, stores: Stores) -> None:
        keys = otks(5, 1, 3)
        await stores.prekeys.add_one_time_prekeys(DEV, keys, BIG)
        claimed = [await stores.prekeys.claim_one_time_prekey(DEV) for _ in range(3)]
        by_id = {k.key_id: k for k in keys}
        assert claimed == [by_id[1], by_id[3], by_id[5]]

    async def test_claim_returns_none_when_empty(self, stores: Stores) -> None:
        assert await stores.prekeys.claim_one_time_prekey(DEV) is None
        await stores.prekeys.add_one_time_prekeys(DEV, otks(1), BIG)
        assert await stores.prekeys.claim_one_time_prekey(DEV) is not None
        assert await stores.prekeys.claim_one_time_prekey(DEV) is None

    async def test_count_follows_adds_and_claims(self, stores: Stores) -> None:
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 0
        added = await stores.prekeys.add_one_time_prekeys(DEV, otks(1, 2, 3), BIG)
        assert (added.held, added.accepted) == (3, True)
        await stores.prekeys.claim_one_time_prekey(DEV)
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 2

    async def test_add_is_idempotent_by_key_id(self, stores: Stores) -> None:
        original = otks(1, 2)
        await stores.prekeys.add_one_time_prekeys(DEV, original, BIG)
        added = await stores.prekeys.add_one_time_prekeys(DEV, otks(2, 3), BIG)
        assert (added.held, added.accepted) == (3, True)
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 3
        await stores.prekeys.claim_one_time_prekey(DEV)
        # key_id 2 kept its first public key: the second add of it changed nothing.
        assert await stores.prekeys.claim_one_time_prekey(DEV) == original[1]

    async def test_a_claimed_key_id_is_never_added_again(self, stores: Stores) -> None:
        keys = otks(1, 2)
        await stores.prekeys.add_one_time_prekeys(DEV, keys, BIG)
        assert await stores.prekeys.claim_one_time_prekey(DEV) == keys[0]
        added = await stores.prekeys.add_one_time_prekeys(DEV, keys, BIG)
        assert added.held == 1
        assert await stores.prekeys.claim_one_time_prekey(DEV) == keys[1]
        assert await stores.prekeys.claim_one_time_prekey(DEV) is None

    async def test_add_past_max_held_adds_nothing(self, stores: Stores) -> None:
        assert (await stores.prekeys.add_one_time_prekeys(DEV, otks(1, 2, 3, 4), 5)).accepted
        refused = await stores.prekeys.add_one_time_prekeys(DEV, otks(5, 6), 5)
        assert (refused.held, refused.accepted) == (4, False)
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 4
        # Keys held already do not count twice against the limit.
        fits = await stores.prekeys.add_one_time_prekeys(DEV, otks(1, 2, 3, 4, 6), 5)
        assert (fits.held, fits.accepted) == (5, True)

    async def test_pools_are_per_device(self, stores: Stores) -> None:
        await stores.prekeys.add_one_time_prekeys(DEV, otks(1, 2), BIG)
        await stores.prekeys.add_one_time_prekeys(OTHER, otks(1), BIG)
        assert await stores.prekeys.claim_one_time_prekey(OTHER) is not None
        assert await stores.prekeys.claim_one_time_prekey(OTHER) is None
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 2

    async def test_200_concurrent_claimers_share_50_keys(self, stores: Stores) -> None:
        keys = otks(*range(50))
        await stores.prekeys.add_one_time_prekeys(DEV, keys, BIG)
        got = await asyncio.gather(*(stores.prekeys.claim_one_time_prekey(DEV) for _ in range(200)))
        handed = [k for k in got if k is not None]
        assert len(handed) == 50
        assert sorted(k.key_id for k in handed) == list(range(50))
        assert {k.public_key for k in handed} == {k.public_key for k in keys}
        assert got.count(None) == 150
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 0

    async def test_two_openers_never_claim_the_same_key(self, open_stores: OpenStores) -> None:
        async with open_stores() as one, open_stores() as two:
            await one.prekeys.add_one_time_prekeys(DEV, otks(*range(40)), BIG)
            claims = [s.prekeys.claim_one_time_prekey(DEV) for s in (one, two) for _ in range(40)]
            got = await asyncio.gather(*claims)
        handed = [k.key_id for k in got if k is not None]
        assert sorted(handed) == list(range(40))

    async def test_prekeys_survive_reopening(self, open_stores: OpenStores) -> None:
        signed, keys = spk(), otks(1, 2)
        async with open_stores() as stores:
            await stores.prekeys.set_signed_prekey(DEV, signed)
            await stores.prekeys.add_one_time_prekeys(DEV, keys, BIG)
            await stores.prekeys.claim_one_time_prekey(DEV)
        async with open_stores() as stores:
            assert await stores.prekeys.signed_prekey(DEV) == signed
            assert await stores.prekeys.count_one_time_prekeys(DEV) == 1
            assert await stores.prekeys.claim_one_time_prekey(DEV) == keys[1]


class PqPrekeyStoreConformance(_StoresFixture):
    async def test_last_resort_is_set_and_replaced(self, stores: Stores) -> None:
        assert await stores.pq_prekeys.last_resort_pq_prekey(DEV) is None
        first, second = pqks(1, 2)
        await stores.pq_prekeys.set_last_resort_pq_prekey(DEV, first)
        assert await stores.pq_prekeys.last_resort_pq_prekey(DEV) == first
        await stores.pq_prekeys.set_last_resort_pq_prekey(DEV, second)
        assert await stores.pq_prekeys.last_resort_pq_prekey(DEV) == second
        assert await stores.pq_prekeys.last_resort_pq_prekey(OTHER) is None

    async def test_pool_claims_lowest_first_once_and_counts(self, stores: Stores) -> None:
        keys = pqks(5, 1, 3)
        added = await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, keys, BIG)
        assert (added.held, added.accepted) == (3, True)
        by_id = {k.key_id: k for k in keys}
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) == by_id[1]
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 2
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) == by_id[3]
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) == by_id[5]
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) is None
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 0

    async def test_pool_is_apart_from_the_x25519_pool(self, stores: Stores) -> None:
        await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, pqks(1, 2), BIG)
        await stores.prekeys.add_one_time_prekeys(DEV, otks(1), BIG)
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 1
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 2
        assert await stores.prekeys.claim_one_time_prekey(DEV) is not None
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 2

    async def test_adds_are_idempotent_and_claimed_ids_never_return(self, stores: Stores) -> None:
        original = pqks(1, 2)
        await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, original, BIG)
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) == original[0]
        added = await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, [*pqks(1, 2), *pqks(3)], BIG)
        assert (added.held, added.accepted) == (2, True)
        # key_id 2 kept its first key; key_id 1 was claimed and stays out.
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) == original[1]
        assert (await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) or pqks(0)[0]).key_id == 3
        assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) is None

    async def test_add_past_max_held_adds_nothing(self, stores: Stores) -> None:
        assert (await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, pqks(1, 2, 3), 4)).accepted
        refused = await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, pqks(4, 5), 4)
        assert (refused.held, refused.accepted) == (3, False)
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 3

    async def test_200_concurrent_claimers_share_50_keys(self, stores: Stores) -> None:
        keys = pqks(*range(50))
        await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, keys, BIG)
        got = await asyncio.gather(
            *(stores.pq_prekeys.claim_one_time_pq_prekey(DEV) for _ in range(200))
        )
        handed = [k for k in got if k is not None]
        assert sorted(k.key_id for k in handed) == list(range(50))
        assert {k.public_key for k in handed} == {k.public_key for k in keys}
        assert {k.signature for k in handed} == {k.signature for k in keys}
        assert got.count(None) == 150

    async def test_pq_prekeys_survive_reopening(self, open_stores: OpenStores) -> None:
        last_resort, keys = pqks(9)[0], pqks(1, 2)
        async with open_stores() as stores:
            await stores.pq_prekeys.set_last_resort_pq_prekey(DEV, last_resort)
            await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, keys, BIG)
            await stores.pq_prekeys.claim_one_time_pq_prekey(DEV)
        async with open_stores() as stores:
            assert await stores.pq_prekeys.last_resort_pq_prekey(DEV) == last_resort
            assert await stores.pq_prekeys.claim_one_time_pq_prekey(DEV) == keys[1]


class PrekeyHandoutConformance(_StoresFixture):
    async def _device(self, stores: Stores, ec: int, pq: int) -> tuple[SignedPrekey, PqPrekey]:
        signed, last_resort = spk(), pqks(10_000)[0]
        await stores.prekeys.set_signed_prekey(DEV, signed)
        await stores.pq_prekeys.set_last_resort_pq_prekey(DEV, last_resort)
        await stores.prekeys.add_one_time_prekeys(DEV, otks(*range(ec)), BIG)
        await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, pqks(*range(pq)), BIG)
        return signed, last_resort

    async def test_one_key_of_each_pool_then_the_last_resort(self, stores: Stores) -> None:
        signed, last_resort = await self._device(stores, ec=1, pq=2)
        first = await stores.handout.claim_bundle_keys(DEV)
        assert first.signed_prekey == signed
        assert first.one_time_prekey is not None and first.one_time_prekey.key_id == 0
        assert first.pq_prekey is not None and first.pq_prekey.key_id == 0
        assert not first.pq_last_resort
        second = await stores.handout.claim_bundle_keys(DEV)
        assert second.one_time_prekey is None  # the X25519 pool is empty
        assert second.pq_prekey is not None and second.pq_prekey.key_id == 1
        third = await stores.handout.claim_bundle_keys(DEV)
        assert (third.pq_prekey, third.pq_last_resort) == (last_resort, True)
        assert (await stores.handout.claim_bundle_keys(DEV)).pq_prekey == last_resort
        assert await stores.pq_prekeys.last_resort_pq_prekey(DEV) == last_resort

    async def test_a_device_without_signed_or_pq_keys_spends_nothing(self, stores: Stores) -> None:
        await stores.prekeys.add_one_time_prekeys(DEV, otks(1), BIG)
        await stores.pq_prekeys.add_one_time_pq_prekeys(DEV, pqks(1), BIG)
        nothing = await stores.handout.claim_bundle_keys(DEV)
        assert (nothing.signed_prekey, nothing.one_time_prekey) == (None, None)
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 1
        # A signed prekey but no PQ key at all (a device from before PQXDH).
        await stores.prekeys.set_signed_prekey(OTHER, spk())
        await stores.prekeys.add_one_time_prekeys(OTHER, otks(1), BIG)
        legacy = await stores.handout.claim_bundle_keys(OTHER)
        assert legacy.signed_prekey is not None
        assert (legacy.one_time_prekey, legacy.pq_prekey) == (None, None)
        assert await stores.prekeys.count_one_time_prekeys(OTHER) == 1

    async def test_concurrent_handouts_give_each_one_time_key_once(self, stores: Stores) -> None:
        _, last_resort = await self._device(stores, ec=30, pq=20)
        got = await asyncio.gather(*(stores.handout.claim_bundle_keys(DEV) for _ in range(60)))
        ec = [b.one_time_prekey.key_id for b in got if b.one_time_prekey is not None]
        pq = [b.pq_prekey.key_id for b in got if b.pq_prekey and not b.pq_last_resort]
        assert sorted(ec) == list(range(30))
        assert sorted(pq) == list(range(20))
        fallbacks = [b.pq_prekey for b in got if b.pq_last_resort]
        assert fallbacks == [last_resort] * 40
        assert await stores.prekeys.count_one_time_prekeys(DEV) == 0
        assert await stores.pq_prekeys.count_one_time_pq_prekeys(DEV) == 0


class AccountDirectoryConformance(_StoresFixture):
    async def _create(self, stores: Stores, user: str = "alice") -> tuple[DeviceList, NewDevice]:
        first = new_device()
        listed = device_list(1, {1: first.identity_key}, user=user)
        assert await stores.accounts.create(listed, first)
        return listed, first

    async def _add(
        self, stores: Stores, current: DeviceList, number: int
    ) -> tuple[DeviceList, NewDevice]:
        device = new_device()
        devices = {d.device: d.identity_key for d in current.devices}
        listed = device_list(current.version + 1, {**devices, number: device.identity_key})
        assert await stores.accounts.add_device(listed, device, expected=current.version)
        return listed, device

    async def test_create_then_account_returns_it(self, stores: Stores) -> None:
        assert await stores.accounts.account("acme", "alice") == AccountState(None, None, 0)
        first = new_device(at=NOW + 3)
        listed = device_list(1, {1: first.identity_key})
        assert await stores.accounts.create(listed, first)
        assert await stores.accounts.account("acme", "alice") == AccountState(
            ACCOUNT_KEY, listed, 1
        )
        record = await stores.devices.get(Address("acme", "alice", 1))
        assert record is not None
        assert (record.identity_key, record.identity_dh_key) == (
            first.identity_key,
            first.identity_dh_key,
        )
        assert (record.identity_dh_signature, record.registered_at_ms) == (
            first.identity_dh_signature,
            NOW + 3,
        )
        assert await stores.devices.list("acme", "alice") == (record,)
        assert await stores.devices.find_identity("acme", "alice", first.identity_key) == record
        assert await stores.devices.find_identity("acme", "bob", first.identity_key) is None
        assert await stores.accounts.account("acme", "bob") == AccountState(None, None, 0)

    async def test_create_is_refused_when_the_user_exists(self, stores: Stores) -> None:
        listed, _ = await self._create(stores)
        again = new_device()
        assert not await stores.accounts.create(device_list(1, {2: again.identity_key}), again)
        assert not await stores.accounts.create(device_list(1, {1: again.identity_key}), again)
        assert await stores.accounts.account("acme", "alice") == AccountState(
            ACCOUNT_KEY, listed, 1
        )
        # A user registered before accounts existed has devices, and so no fresh start.
        legacy = await register(stores.devices, user="bob")
        bob = new_device()
        assert not await stores.accounts.create(
            device_list(1, {2: bob.identity_key}, user="bob"), bob
        )
        assert not await stores.accounts.create(
            device_list(1, {1: bob.identity_key}, user="bob"), bob
        )
        assert await stores.accounts.account("acme", "bob") == AccountState(None, None, 1)
        assert await stores.devices.list("acme", "bob") == (legacy,)

    async def test_create_is_refused_unless_it_names_device_last_plus_one(
        self, stores: Stores
    ) -> None:
        device = new_device()
        assert not await stores.accounts.create(device_list(1, {2: device.identity_key}), device)
        other = os.urandom(32)
        both = device_list(1, {1: device.identity_key, 2: other})
        assert not await stores.accounts.create(both, device)
        assert await stores.accounts.account("acme", "alice") == AccountState(None, None, 0)
        assert await stores.devices.list("acme", "alice") == ()
        assert await stores.accounts.create(device_list(1, {1: device.identity_key}), device)

    async def test_a_reset_removes_the_old_devices_and_numbers_go_on(self, stores: Stores) -> None:
        first_list, first = await self._create(stores)
        second_list, second = await self._add(stores, first_list, 2)
        fresh = new_device(at=NOW + 50)
        new_key = os.urandom(32)
        reset = device_list(3, {3: fresh.identity_key}, account_key=new_key)
        assert not await stores.accounts.create(reset, fresh)  # no replaces: the user exists
        assert not await stores.accounts.create(reset, fresh, replaces=1)  # not current
        wrong_number = device_list(3, {4: fresh.identity_key}, account_key=new_key)
        assert not await stores.accounts.create(wrong_number, fresh, replaces=2)
        assert not await stores.accounts.create(
            device_list(1, {1: fresh.identity_key}, user="bob"), fresh, replaces=1
        )  # bob has no account to replace
        assert await stores.accounts.account("acme", "alice") == AccountState(
            ACCOUNT_KEY, second_list, 2
        )
        assert await stores.accounts.create(reset, fresh, replaces=2)
        assert await stores.accounts.account("acme", "alice") == AccountState(new_key, reset, 3)
        listed = await stores.devices.list("acme", "alice")
        assert [d.address.device for d in listed] == [3]
        for number, old in ((1, first), (2, second)):
            assert await stores.devices.get(Address("acme", "alice", number)) is None
            found = await stores.devices.find_identity("acme", "alice", old.identity_key)
            assert found is not None and found.address.device == number
            assert found.removed_at_ms == NOW + 50
        await self._add(stores, reset, 4)
        assert (await stores.accounts.account("acme", "alice")).last_device == 4

    async def test_add_device_needs_the_current_version_and_the_next_number(
        self, stores: Stores
    ) -> None:
        first_list, first = await self._create(stores)
        device = new_device()
        two = device_list(2, {1: first.identity_key, 2: device.identity_key})
        assert not await stores.accounts.add_device(two, device, expected=2)
        assert not await stores.accounts.add_device(two, device, expected=0)
        three = device_list(2, {1: first.identity_key, 3: device.identity_key})
        assert not await stores.accounts.add_device(three, device, expected=1)
        assert len(await stores.devices.list("acme", "alice")) == 1
        assert await stores.accounts.account("acme", "alice") == AccountState(
            ACCOUNT_KEY, first_list, 1
        )
        assert await stores.accounts.add_device(two, device, expected=1)
        assert await stores.accounts.account("acme", "alice") == AccountState(ACCOUNT_KEY, two, 2)
        record = await stores.devices.get(Address("acme", "alice", 2))
        assert record is not None and record.identity_key == device.identity_key
        # The list moved on: the version read before is stale now.
        late = new_device()
        stale = device_list(2, {1: first.identity_key, 3: late.identity_key})
        assert not await stores.accounts.add_device(stale, late, expected=1)
        # An identity key already registered for the user never gets a second device.
        reused = device_list(
            3, {1: first.identity_key, 2: device.identity_key, 3: first.identity_key}
        )
        assert not await stores.accounts.add_device(
            reused, new_device(first.identity_key), expected=2
        )
        assert not await stores.accounts.add_device(
            device_list(2, {1: first.identity_key}), device, expected=1
        )
        # No account: nothing to add to.
        nobody = new_device()
        alone = device_list(1, {1: nobody.identity_key}, user="bob")
        assert not await stores.accounts.add_device(alone, nobody, expected=0)
        assert await stores.accounts.account("acme", "bob") == AccountState(None, None, 0)

    async def test_a_legacy_registration_takes_a_number_from_add_device(
        self, stores: Stores
    ) -> None:
        _, first = await self._create(stores)
        legacy = await register(stores.devices)
        assert legacy.address.device == 2
        device = new_device()
        two = device_list(2, {1: first.identity_key, 2: device.identity_key})
        assert not await stores.accounts.add_device(two, device, expected=1)
        three = device_list(2, {1: first.identity_key, 3: device.identity_key})
        assert await stores.accounts.add_device(three, device, expected=1)
        assert (await stores.accounts.account("acme", "alice")).last_device == 3

    async def test_concurrent_add_device_in_two_processes_one_wins(
        self, open_stores: OpenStores
    ) -> None:
        async with open_stores() as one, open_stores() as two:
            _, first = await self._create(one)
            devices = [new_device() for _ in range(6)]
            lists = [device_list(2, {1: first.identity_key, 2: d.identity_key}) for d in devices]
            results = await asyncio.gather(
                *(
                    s.accounts.add_device(listed, d, expected=1)
                    for s, listed, d in zip([one, two] * 3, lists, devices, strict=True)
                )
            )
            assert sorted(results) == [False] * 5 + [True]
            winner = results.index(True)
            state = await two.accounts.account("acme", "alice")
            assert state == AccountState(ACCOUNT_KEY, lists[winner], 2)
            listed = await one.devices.list("acme", "alice")
            assert [d.identity_key for d in listed] == [
                first.identity_key,
                devices[winner].identity_key,
            ]

    async def test_concurrent_creates_in_two_processes_one_wins(
        self, open_stores: OpenStores
    ) -> None:
        async with open_stores() as one, open_stores() as two:
            devices = [new_device() for _ in range(6)]
            lists = [device_list(1, {1: d.identity_key}) for d in devices]
            results = await asyncio.gather(
                *(
                    s.accounts.create(listed, d)
                    for s, listed, d in zip([one, two] * 3, lists, devices, strict=True)
                )
            )
            assert sorted(results) == [False] * 5 + [True]
            winner = results.index(True)
            assert await one.accounts.account("acme", "alice") == AccountState(
                ACCOUNT_KEY, lists[winner], 1
            )
            assert len(await two.devices.list("acme", "alice")) == 1

    async def test_remove_devices_marks_them_removed(self, stores: Stores) -> None:
        first_list, first = await self._create(stores)
        second_list, second = await self._add(stores, first_list, 2)
        _, third = await self._add(stores, second_list, 3)
        kept = device_list(4, {1: first.identity_key, 3: third.identity_key})
        assert not await stores.accounts.remove_devices(kept, [2], NOW + 9, expected=2)
        assert await stores.devices.get(Address("acme", "alice", 2)) is not None
        assert await stores.accounts.remove_devices(kept, [2], NOW + 9, expected=3)
        assert await stores.devices.get(Address("acme", "alice", 2)) is None
        listed = await stores.devices.list("acme", "alice")
        assert [d.address.device for d in listed] == [1, 3]
        found = await stores.devices.find_identity("acme", "alice", second.identity_key)
        assert found is not None and found.removed_at_ms == NOW + 9
        assert await stores.accounts.account("acme", "alice") == AccountState(ACCOUNT_KEY, kept, 3)
        # Its number stays taken: the next device is 4, never 2.
        device = new_device()
        reuse = device_list(
            5, {1: first.identity_key, 2: device.identity_key, 3: third.identity_key}
        )
        assert not await stores.accounts.add_device(reuse, device, expected=4)
        await self._add(stores, kept, 4)
        # Removing nothing but storing a list is a change too; unknown numbers are ignored.
        current = (await stores.accounts.account("acme", "alice")).device_list
        assert current is not None
        same = dataclasses.replace(current, version=6, signature=os.urandom(64))
        assert await stores.accounts.remove_devices(same, [9], NOW, expected=5)
        assert (await stores.accounts.account("acme", "alice")).device_list == same
        assert len(await stores.devices.list("acme", "alice")) == 3

    async def test_accounts_survive_reopening(self, open_stores: OpenStores) -> None:
        async with open_stores() as stores:
            listed, _ = await self._create(stores)
        async with open_stores() as stores:
            assert await stores.accounts.account("acme", "alice") == AccountState(
                ACCOUNT_KEY, listed, 1
            )


def pending_link(
    user: str = "alice", *, created: int = NOW, expires: int = NOW + 60_000
) -> PendingLink:
    """A link request with random keys (stores do not check them; the core does)."""
    return PendingLink(
        request_id=os.urandom(16),
        tenant="acme",
        user=user,
        identity_key=os.urandom(32),
        identity_dh_key=os.urandom(32),
        identity_dh_signature=os.urandom(64),
        signed_prekey=spk(7),
        last_resort_pq_prekey=pqks(8)[0],
        link_key=os.urandom(32),
        created_at_ms=created,
        expires_at_ms=expires,
    )


def approval(device: int = 2) -> LinkApproval:
    listed = device_list(2, {1: os.urandom(32), device: os.urandom(32)})
    return LinkApproval(device, os.urandom(80), listed)


class LinkRequestsConformance(_StoresFixture):
    async def test_added_requests_are_pending_oldest_first(self, stores: Stores) -> None:
        later, earlier = pending_link(created=NOW + 5), pending_link(created=NOW)
        assert await stores.links.add(later, 5, NOW + 10)
        assert await stores.links.add(earlier, 5, NOW + 10)
        assert await stores.links.add(pending_link("bob"), 5, NOW + 10)
        assert await stores.links.pending("acme", "alice", NOW + 10) == (earlier, later)
        assert await stores.links.get(later.request_id, NOW + 10) == later
        assert await stores.links.get(os.urandom(16), NOW + 10) is None
        assert await stores.links.pending("acme", "carol", NOW + 10) == ()

    async def test_add_respects_max_pending_and_approved_ones_do_not_count(
        self, stores: Stores
    ) -> None:
        first, second = pending_link(), pending_link()
        assert await stores.links.add(first, 2, NOW)
        assert await stores.links.add(second, 2, NOW)
        third = pending_link()
        assert not await stores.links.add(third, 2, NOW)
        assert await stores.links.get(third.request_id, NOW) is None
        assert await stores.links.add(pending_link("bob"), 2, NOW)  # per user
        assert await stores.links.approve(first.request_id, approval(), NOW)
        assert await stores.links.add(third, 2, NOW)
        assert {x.request_id for x in await stores.links.pending("acme", "alice", NOW)} == {
            second.request_id,
            third.request_id,
        }

    async def test_expired_requests_are_gone(self, stores: Stores) -> None:
        link = pending_link(expires=NOW + 1000)
        assert await stores.links.add(link, 1, NOW)
        assert await stores.links.get(link.request_id, NOW + 999) == link
        assert await stores.links.pending("acme", "alice", NOW + 999) == (link,)
        assert await stores.links.get(link.request_id, NOW + 1000) is None
        assert await stores.links.pending("acme", "alice", NOW + 1000) == ()
        assert not await stores.links.approve(link.request_id, approval(), NOW + 1000)
        # An expired request no longer counts against the limit.
        again = pending_link(created=NOW + 1000, expires=NOW + 5000)
        assert await stores.links.add(again, 1, NOW + 1000)
        assert await stores.links.pending("acme", "alice", NOW + 1000) == (again,)

    async def test_a_request_is_approved_once(self, stores: Stores) -> None:
        link = pending_link()
        await stores.links.add(link, 5, NOW)
        approved = approval(3)
        assert await stores.links.approve(link.request_id, approved, NOW)
        assert not await stores.links.approve(link.request_id, approval(4), NOW)
        assert await stores.links.get(link.request_id, NOW) == dataclasses.replace(
            link, approval=approved
        )
        assert await stores.links.pending("acme", "alice", NOW) == ()
        assert not await stores.links.approve(os.urandom(16), approval(), NOW)

    async def test_concurrent_approvals_in_two_processes_one_wins(
        self, open_stores: OpenStores
    ) -> None:
        link = pending_link()
        async with open_stores() as one, open_stores() as two:
            await one.links.add(link, 5, NOW)
            approvals = [approval() for _ in range(8)]
            results = await asyncio.gather(
                *(
                    s.links.approve(link.request_id, a, NOW)
                    for s, a in zip([one, two] * 4, approvals, strict=True)
                )
            )
            assert sorted(results) == [False] * 7 + [True]
            got = await two.links.get(link.request_id, NOW)
            assert got is not None and got.approval == approvals[results.index(True)]


class OnceOnlyConformance(_StoresFixture):
    async def test_first_use_only(self, stores: Stores) -> None:
        digest = os.urandom(32)
        assert await stores.once.first_use("token", digest, NOW + 60_000, NOW)
        assert not await stores.once.first_use("token", digest, NOW + 60_000, NOW + 1)
        assert not await stores.once.first_use("token", digest, NOW + 90_000, NOW + 2)
        assert await stores.once.first_use("request", digest, NOW + 60_000, NOW)  # per kind
        assert await stores.once.first_use("token", os.urandom(32), NOW + 60_000, NOW)

    async def test_concurrent_first_uses_in_two_processes_one_wins(
        self, open_stores: OpenStores
    ) -> None:
        digest = os.urandom(32)
        async with open_stores() as one, open_stores() as two:
            results = await asyncio.gather(
                *(s.once.first_use("request", digest, NOW + 60_000, NOW) for s in [one, two] * 5)
            )
        assert sorted(results) == [False] * 9 + [True]

    async def test_after_expiry_a_digest_is_new_again(self, stores: Stores) -> None:
        digest = os.urandom(32)
        assert await stores.once.first_use("token", digest, NOW + 1000, NOW)
        assert not await stores.once.first_use("token", digest, NOW + 5000, NOW + 999)
        assert await stores.once.first_use("token", digest, NOW + 5000, NOW + 1000)
        assert not await stores.once.first_use("token", digest, NOW + 5000, NOW + 1001)
        assert not await stores.once.first_use("token", digest, NOW + 9000, NOW + 4999)
        assert await stores.once.first_use("token", digest, NOW + 9000, NOW + 5000)

    async def test_concurrent_reuses_after_expiry_one_wins(self, open_stores: OpenStores) -> None:
        digest = os.urandom(32)
        async with open_stores() as one, open_stores() as two:
            assert await one.once.first_use("token", digest, NOW + 1000, NOW)
            results = await asyncio.gather(
                *(s.once.first_use("token", digest, NOW + 9000, NOW + 2000) for s in [one, two] * 4)
            )
        assert sorted(results) == [False] * 7 + [True]
