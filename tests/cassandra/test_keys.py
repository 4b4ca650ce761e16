"""The Cassandra key stores: the keyserver conformance suites, and claims across processes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest

from keyserver.app import KeyserverApp
from keyserver.cassandra_store import cassandra_key_stores
from keyserver.client import REMOVE_DEVICE_METHOD
from keyserver.model import OneTimePrekey
from relay.clock import FakeClock
from relay.common.cassandra.session import CassandraSession
from relay.common.convert import address_from_pb, address_to_pb, device_list_to_pb
from relay.config import CassandraConfig
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from relaypb.keys.v1 import keys_pb2_grpc
from tests.keyserver.conformance import (
    BIG,
    DEV,
    AccountDirectoryConformance,
    DeviceDirectoryConformance,
    LinkRequestsConformance,
    OnceOnlyConformance,
    OpenStores,
    PqPrekeyStoreConformance,
    PrekeyHandoutConformance,
    PrekeyStoreConformance,
    Stores,
    otks,
    pqks,
    spk,
)
from tests.keyserver.keys import Account, DeviceKeys
from tests.keyserver.wire import config as wire_config
from tests.keyserver.wire import device_list as wire_device_list
from tests.keyserver.wire import fetch as wire_fetch
from tests.keyserver.wire import identity_key as wire_identity_key
from tests.keyserver.wire import link as wire_link
from tests.keyserver.wire import list_devices as wire_list_devices
from tests.keyserver.wire import register as wire_register
from tests.keyserver.wire import sign as wire_sign

pytestmark = pytest.mark.services


@asynccontextmanager
async def open_cassandra_stores(config: CassandraConfig) -> AsyncIterator[Stores]:
    """Stores on a session of their own: each opener stands for another process."""
    async with CassandraSession(config) as session:
        yield cassandra_key_stores(session)


class TestCassandraKeyStores(
    DeviceDirectoryConformance,
    AccountDirectoryConformance,
    LinkRequestsConformance,
    OnceOnlyConformance,
    PrekeyStoreConformance,
    PqPrekeyStoreConformance,
    PrekeyHandoutConformance,
):
    @pytest.fixture
    def open_stores(self, fresh: CassandraSession, cassandra_config: CassandraConfig) -> OpenStores:
        return lambda: open_cassandra_stores(cassandra_config)


async def test_200_claimers_in_4_processes_share_50_keys(
    fresh: CassandraSession, cassandra_config: CassandraConfig
) -> None:
    keys = otks(*range(50))
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(open_cassandra_stores(cassandra_config))
            for _ in range(4)
        ]
        await stores[0].prekeys.add_one_time_prekeys(DEV, keys, BIG)
        got = await asyncio.gather(
            *(s.prekeys.claim_one_time_prekey(DEV) for s in stores for _ in range(50))
        )
    handed = [k for k in got if k is not None]
    assert len(handed) == 50
    assert sorted(k.key_id for k in handed) == list(range(50))
    assert {k.public_key for k in handed} == {k.public_key for k in keys}


async def test_200_pq_claimers_in_4_processes_share_50_keys(
    fresh: CassandraSession, cassandra_config: CassandraConfig
) -> None:
    keys = pqks(*range(50))
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(open_cassandra_stores(cassandra_config))
            for _ in range(4)
        ]
        await stores[0].pq_prekeys.add_one_time_pq_prekeys(DEV, keys, BIG)
        got = await asyncio.gather(
            *(s.pq_prekeys.claim_one_time_pq_prekey(DEV) for s in stores for _ in range(50))
        )
    handed = [k for k in got if k is not None]
    assert sorted(k.key_id for k in handed) == list(range(50))
    assert {(k.public_key, k.signature) for k in handed} == {
        (k.public_key, k.signature) for k in keys
    }


async def test_bundle_handouts_in_4_processes_give_each_key_once(
    fresh: CassandraSession, cassandra_config: CassandraConfig
) -> None:
    last_resort = pqks(999)[0]
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(open_cassandra_stores(cassandra_config))
            for _ in range(4)
        ]
        await stores[0].prekeys.set_signed_prekey(DEV, spk())
        await stores[0].pq_prekeys.set_last_resort_pq_prekey(DEV, last_resort)
        await stores[0].prekeys.add_one_time_prekeys(DEV, otks(*range(40)), BIG)
        await stores[0].pq_prekeys.add_one_time_pq_prekeys(DEV, pqks(*range(25)), BIG)
        got = await asyncio.gather(
            *(s.handout.claim_bundle_keys(DEV) for s in stores for _ in range(15))
        )
    ec = [b.one_time_prekey.key_id for b in got if b.one_time_prekey is not None]
    pq = [b.pq_prekey.key_id for b in got if b.pq_prekey is not None and not b.pq_last_resort]
    assert sorted(ec) == list(range(40))
    assert sorted(pq) == list(range(25))
    assert [b.pq_prekey for b in got if b.pq_last_resort] == [last_resort] * 35


async def test_registrations_in_3_processes_get_distinct_numbers(
    fresh: CassandraSession, cassandra_config: CassandraConfig
) -> None:
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(open_cassandra_stores(cassandra_config))
            for _ in range(3)
        ]
        shared_key = os.urandom(32)

        async def register(s: Stores, identity_key: bytes) -> int:
            record = await s.devices.register(
                "acme",
                "carol",
                identity_key=identity_key,
                identity_dh_key=os.urandom(32),
                identity_dh_signature=os.urandom(64),
                registered_at_ms=1,
            )
            return record.address.device

        distinct = [register(s, os.urandom(32)) for s in stores for _ in range(8)]
        same = [register(s, shared_key) for s in stores]
        numbers = await asyncio.gather(*distinct, *same)
    assert sorted(numbers[:24]) == sorted(set(numbers[:24]))
    assert len(set(numbers[24:])) == 1  # one identity key, one device
    assert sorted(set(numbers)) == list(range(1, 26))


async def test_racing_publishes_and_claims_hand_each_key_out_once(
    fresh: CassandraSession, cassandra_config: CassandraConfig
) -> None:
    keys = otks(*range(20))
    async with (
        open_cassandra_stores(cassandra_config) as one,
        open_cassandra_stores(cassandra_config) as two,
    ):
        publishes = [s.prekeys.add_one_time_prekeys(DEV, keys, BIG) for s in (one, two, one)]
        claims = [s.prekeys.claim_one_time_prekey(DEV) for s in (one, two) for _ in range(10)]
        racing = await asyncio.gather(*claims, *publishes)
        after = [await two.prekeys.claim_one_time_prekey(DEV) for _ in range(21)]
    handed = [k.key_id for k in [*racing[:20], *after] if isinstance(k, OneTimePrekey)]
    assert sorted(handed) == list(range(20))


async def test_key_directory_on_cassandra_end_to_end(
    fresh: CassandraSession, cassandra_config: CassandraConfig, tmp_path: Path
) -> None:
    """The gRPC key directory on Cassandra: accounts, linking, PQ handout, removal."""
    clock = FakeClock()
    cfg = wire_config(
        tmp_path,
        **{
            "storage.backend": "cassandra",
            "cassandra.port": cassandra_config.port,
            "cassandra.keyspace": cassandra_config.keyspace,
            "cassandra.request_timeout_seconds": 30.0,
        },
    )
    account, phone, laptop = Account(), DeviceKeys(), DeviceKeys()
    async with (
        KeyserverApp(cfg, clock) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        one = await wire_register(stub, phone, one_time=[1], one_time_pq=[1, 2], account=account)
        two = await wire_link(stub, clock, account, phone, one, laptop)
        assert two == Address("acme", "alice", 2)
        got = [(await wire_fetch(stub, clock, phone, one, devices=[1]))[0] for _ in range(3)]
        assert [b.pq_prekey.key_id for b in got] == [1, 2, 1_000_000]
        assert [b.pq_prekey_last_resort for b in got] == [False, False, True]
        assert [b.HasField("one_time_prekey") for b in got] == [True, False, False]
        without = account.without(2)
        request = pb.RemoveDeviceRequest(
            device=address_to_pb(two), device_list=device_list_to_pb(without)
        )
        md = wire_sign(clock, phone, one, REMOVE_DEVICE_METHOD, request)
        await stub.RemoveDevice(request, metadata=md)
        account.commit(without)
        listed = await wire_list_devices(stub, clock, phone, one)
        assert [address_from_pb(d.address) for d in listed] == [one]
        stored = await wire_device_list(stub, clock, phone, one)
        assert stored == device_list_to_pb(without)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await wire_identity_key(stub, clock, phone, one, two)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        # A new device is linked, not registered, and gets a number never used.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await wire_register(stub, DeviceKeys())
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        third = await wire_link(stub, clock, account, phone, one, DeviceKeys())
        assert third == Address("acme", "alice", 3)
