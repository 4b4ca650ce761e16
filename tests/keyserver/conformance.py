"""Conformance suites for ``keyserver.ports.DeviceDirectory`` and ``PrekeyStore``.

Run against every backend: a backend's test module subclasses the suites and provides
an ``open_stores`` fixture, a factory whose every call opens (as an async context
manager) a ``Stores`` on the same, initially empty, backing storage (one SQLite file,
one Cassandra keyspace). Opening it twice at once stands for two processes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from keyserver.model import DeviceRecord, OneTimePrekey, PqPrekey, SignedPrekey
from keyserver.ports import DeviceDirectory, KeyStores
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
