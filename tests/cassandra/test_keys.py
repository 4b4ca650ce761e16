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
from keyserver.client import REMOVE_DEVICE_METHOD, sign_request_metadata
from keyserver.model import OneTimePrekey
from relay.clock import FakeClock
from relay.common.cassandra.session import CassandraSession
from relay.common.convert import address_from_pb, address_to_pb
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
from tests.keyserver.keys import DeviceKeys
from tests.keyserver.wire import config as wire_config
from tests.keyserver.wire import register as wire_register

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
    """The gRPC key directory on the Cassandra backend: PQ handout, fallback, removal."""
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
    phone, laptop = DeviceKeys(), DeviceKeys()
    async with (
        KeyserverApp(cfg, clock) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        one = await wire_register(stub, phone, one_time=[1], one_time_pq=[1, 2])
        two = await wire_register(stub, laptop)
        fetch = pb.FetchPrekeyBundlesRequest(tenant="acme", user="alice", devices=[1])
        got = [(await stub.FetchPrekeyBundles(fetch)).bundles[0] for _ in range(3)]
        assert [b.pq_prekey.key_id for b in got] == [1, 2, 1_000_000]
        assert [b.pq_prekey_last_resort for b in got] == [False, False, True]
        assert [b.HasField("one_time_prekey") for b in got] == [True, False, False]
        request = pb.RemoveDeviceRequest(device=address_to_pb(two))
        md = sign_request_metadata(REMOVE_DEVICE_METHOD, one, phone.signing, request, clock)
        await stub.RemoveDevice(request, metadata=md)
        listed = await stub.ListDevices(pb.ListDevicesRequest(tenant="acme", user="alice"))
        assert [address_from_pb(d.address) for d in listed.devices] == [one]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetIdentityKey(pb.GetIdentityKeyRequest(device=address_to_pb(two)))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert await wire_register(stub, DeviceKeys()) == Address("acme", "alice", 3)
