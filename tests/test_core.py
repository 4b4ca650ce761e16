"""Unit tests of the relay core on the embedded store with a fake clock (no network)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.clock import FakeClock
from relay.config import LimitsConfig
from relay.core.auth import ApiKeys, DeviceAuthenticator, ServiceSender
from relay.core.delivery import Relay
from relay.core.sessions import Deliver, QueueEmpty, Session
from relay.errors import (
    DeviceRemoved,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    SessionDisplaced,
    Status,
    Unauthenticated,
)
from relay.metrics import RelayMetrics
from relay.model import Address, Envelope, Outcome, Pushed, registration_id
from relay.stores.sqlite_queue import SqliteQueue
from tests.support import pub

ALICE = Address("t", "alice", 1)
BOB = Address("t", "bob", 1)


class FakeIdentities:
    """IdentityKeys from a dict."""

    def __init__(self) -> None:
        self.keys: dict[Address, bytes] = {}
        self.list_calls: list[bool] = []
        self.forgotten: list[Address] = []

    async def identity_key(self, device: Address) -> bytes | None:
        return self.keys.get(device)

    def forget(self, device: Address) -> None:
        # Keys stay: as a cache refilled by a lookup that raced the removal would.
        self.forgotten.append(device)

    async def devices(self, tenant: str, user: str, *, fresh: bool = False) -> dict[int, int]:
        self.list_calls.append(fresh)
        return {
            a.device: registration_id(k)
            for a, k in self.keys.items()
            if (a.tenant, a.user) == (tenant, user)
        }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def identities() -> FakeIdentities:
    ids = FakeIdentities()
    ids.keys[ALICE] = b"a" * 32
    ids.keys[BOB] = b"b" * 32
    return ids


@pytest.fixture
async def relay(
    tmp_path: Path, clock: FakeClock, identities: FakeIdentities
) -> AsyncIterator[Relay]:
    async with SqliteQueue(tmp_path / "q.db", clock=clock) as queue:
        yield Relay(
            queue=queue,
            identities=identities,
            clock=clock,
            limits=LimitsConfig(default_ttl_seconds=60, max_ttl_seconds=3600),
            metrics=RelayMetrics(),
        )


def env(content: bytes = b"c", ttl: int = 0, to: Address = BOB) -> Envelope:
    return Envelope(os.urandom(16), ALICE, to, content, ttl_seconds=ttl)


async def drain(session: Session) -> list[bytes]:
    """Contents delivered up to the QueueEmpty marker."""
    out: list[bytes] = []
    events = session.events()
    async for ev in events:
        if isinstance(ev, QueueEmpty):
            break
        assert isinstance(ev, Deliver)
        out += [e.content for e in ev.envelopes]
    await events.aclose()
    return out


async def test_ttl_expiry_skips_and_purges(relay: Relay, clock: FakeClock) -> None:
    res = await relay.send(ALICE, [env(b"short", ttl=10), env(b"default")])
    assert [r.outcome for r in res] == [Outcome.STORED, Outcome.STORED]
    clock.advance(11_000)
    assert await drain(await relay.open_session(BOB, receive=True)) == [b"default"]
    clock.advance(60_000)
    assert await relay.purge_expired() == 2
    assert await drain(await relay.open_session(BOB, receive=True)) == []


async def test_ttl_over_maximum_is_rejected(relay: Relay) -> None:
    (res,) = await relay.send(ALICE, [env(ttl=3601)])
    assert res.outcome is Outcome.REJECTED
    assert res.error is not None and "max_ttl_seconds" in res.error.message


async def test_batch_over_limit_raises_naming_it(relay: Relay) -> None:
    with pytest.raises(LimitExceeded) as info:
        await relay.send(ALICE, [env() for _ in range(1001)])
    assert info.value.limit == "max_batch_envelopes" and info.value.value == 1000


async def test_sender_is_the_authenticated_one(relay: Relay) -> None:
    forged = Envelope(os.urandom(16), Address("t", "mallory", 9), BOB, b"x")
    await relay.send(ALICE, [forged])
    session = await relay.open_session(BOB, receive=True)
    events = session.events()
    first = await anext(events)
    assert isinstance(first, Deliver) and first.envelopes[0].sender == ALICE
    await events.aclose()


async def test_displaced_session_raises(relay: Relay) -> None:
    old = await relay.open_session(BOB, receive=True)
    events = old.events()
    assert isinstance(await anext(events), QueueEmpty)
    new = await relay.open_session(BOB, receive=True)
    assert new.epoch > old.epoch
    with pytest.raises(SessionDisplaced):
        await anext(events)
    assert relay.sessions.get(BOB) is new
    await relay.close_session(old)  # late close of the old one keeps the new one
    assert relay.sessions.get(BOB) is new


async def test_live_envelope_wakes_session(relay: Relay) -> None:
    session = await relay.open_session(BOB, receive=True)
    events = session.events()
    assert isinstance(await anext(events), QueueEmpty)
    await relay.send(ALICE, [env(b"live")])
    ev = await anext(events)
    assert isinstance(ev, Deliver) and [e.content for e in ev.envelopes] == [b"live"]
    await events.aclose()


async def test_challenge_is_time_bounded_and_bound_to_the_device(clock: FakeClock) -> None:
    sk = Ed25519PrivateKey.generate()
    ids = FakeIdentities()
    ids.keys[BOB] = pub(sk)
    auth = DeviceAuthenticator(ids, clock, "node-a", timeout_ms=30_000)
    ch = auth.challenge(BOB)
    await auth.verify(ch, sk.sign(ch.transcript()))
    other = auth.challenge(BOB)
    assert other.nonce != ch.nonce
    with pytest.raises(Unauthenticated, match="does not verify"):
        await auth.verify(other, sk.sign(ch.transcript()))  # replay of the first answer
    late = auth.challenge(BOB)
    clock.advance(30_001)
    with pytest.raises(Unauthenticated, match="auth_timeout_seconds"):
        await auth.verify(late, sk.sign(late.transcript()))


def test_api_keys() -> None:
    import hashlib

    keys = ApiKeys({hashlib.sha256(b"k" * 20).digest(): ServiceSender("t", "svc")})
    assert keys.authenticate("k" * 20).address == Address("t", "service:svc", 0)
    with pytest.raises(Unauthenticated):
        keys.authenticate("wrong")
    with pytest.raises(Unauthenticated, match="missing"):
        keys.authenticate(None)
    with pytest.raises(Unauthenticated, match="no API keys"):
        ApiKeys({}).authenticate("k" * 20)


class CountingQueue:
    """Wraps a queue and counts reads (to see when a session reads its store)."""

    def __init__(self, inner: SqliteQueue) -> None:
        self.inner = inner
        self.reads = 0

    async def append(self, *a, **k):  # type: ignore[no-untyped-def]
        return await self.inner.append(*a, **k)

    async def read(self, *a, **k):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await self.inner.read(*a, **k)

    async def ack(self, *a, **k):  # type: ignore[no-untyped-def]
        return await self.inner.ack(*a, **k)

    def resume_point(self, cursor: int) -> int:
        return self.inner.resume_point(cursor)

    async def purge_expired(self, *a, **k):  # type: ignore[no-untyped-def]
        return await self.inner.purge_expired(*a, **k)

    async def purge(self, *a, **k):  # type: ignore[no-untyped-def]
        return await self.inner.purge(*a, **k)


@pytest.fixture
async def counting(tmp_path: Path, clock: FakeClock, identities: FakeIdentities):  # type: ignore[no-untyped-def]
    async with SqliteQueue(tmp_path / "c.db", clock=clock) as inner:
        queue = CountingQueue(inner)
        relay = Relay(
            queue=queue,
            identities=identities,
            clock=clock,
            limits=LimitsConfig(session_repoll_seconds=3600),  # no safety net here
            metrics=RelayMetrics(),
        )
        yield relay, queue


async def test_in_order_pushes_skip_the_store(counting) -> None:  # type: ignore[no-untyped-def]
    relay, queue = counting
    bob = await relay.open_session(BOB, receive=True)
    alice = await relay.open_session(ALICE, receive=False)
    events = bob.events()
    assert isinstance(await anext(events), QueueEmpty)
    await relay.send(ALICE, [env(b"1")], alice)
    first = await anext(events)  # prev_seq unknown: read from the store once
    assert [e.content for e in first.envelopes] == [b"1"]
    reads = queue.reads
    for n in range(2, 6):
        await relay.send(ALICE, [env(b"%d" % n)], alice)
        ev = await anext(events)
        assert [e.content for e in ev.envelopes] == [b"%d" % n]
    assert queue.reads == reads  # delivered directly, provably in order
    await events.aclose()


async def test_lost_wakeup_is_caught_in_order(counting) -> None:  # type: ignore[no-untyped-def]
    relay, queue = counting
    bob = await relay.open_session(BOB, receive=True)
    events = bob.events()
    assert isinstance(await anext(events), QueueEmpty)
    # Three envelopes are stored, but only the last one's wake-up arrives.
    stored = [env(b"a"), env(b"b"), env(b"c")]
    results = await queue.append(stored, [2**62] * 3, relay._queue_limits)
    seqs = [r.seq for r in results]
    bob.push([Pushed(stored[2], seqs[2], seqs[1])])
    got: list[bytes] = []
    async with asyncio.timeout(10):
        while len(got) < 3:
            ev = await anext(events)
            got += [e.content for e in ev.envelopes]
    assert got == [b"a", b"b", b"c"]
    await events.aclose()


async def test_reread_all_and_remote_displace(relay: Relay) -> None:
    bob = await relay.open_session(BOB, receive=True)
    events = bob.events()
    assert isinstance(await anext(events), QueueEmpty)
    relay.router.displace(BOB, bob.epoch - 1)  # older epoch: ignored
    assert relay.sessions.get(BOB) is bob and not bob.displaced
    relay.router.displace(BOB, bob.epoch + 1)
    assert bob.displaced and relay.sessions.get(BOB) is None
    with pytest.raises(SessionDisplaced):
        await anext(events)


async def test_device_list_check_refuses_only_the_mismatched_user(
    relay: Relay, identities: FakeIdentities
) -> None:
    bob2, bob3 = Address("t", "bob", 2), Address("t", "bob", 3)
    alice2 = Address("t", "alice", 2)
    for device in (bob2, alice2):
        identities.keys[device] = os.urandom(32)
    reg = {a: registration_id(k) for a, k in identities.keys.items()}
    # bob: device 1 addressed with a wrong registration id, 2 missing, 3 extra.
    envs = [env(to=BOB), env(to=bob3), env(to=alice2)]
    ids = [reg[BOB] ^ 1, 7, reg[alice2]]
    outcomes, mismatches = await relay.send_checked(
        ALICE, envs, ids, [("t", "bob"), ("t", "alice")]
    )
    assert [o.outcome for o in outcomes] == [Outcome.REJECTED, Outcome.REJECTED, Outcome.STORED]
    assert outcomes[0].error is not None
    assert outcomes[0].error.status is Status.FAILED_PRECONDITION
    assert "t/bob" in outcomes[0].error.message
    [m] = mismatches
    assert (m.tenant, m.user, m.missing, m.extra, m.stale) == ("t", "bob", (2,), (3,), (1,))
    # The cached list was rechecked fresh before refusing.
    assert True in identities.list_calls


async def test_device_list_check_passes_with_the_full_list(
    relay: Relay, identities: FakeIdentities
) -> None:
    bob2 = Address("t", "bob", 2)
    identities.keys[bob2] = os.urandom(32)
    envs = [env(to=BOB), env(to=bob2)]
    ids = [registration_id(identities.keys[BOB]), registration_id(identities.keys[bob2])]
    # The sender's own user (alice has only the sending device) is complete when empty.
    outcomes, mismatches = await relay.send_checked(
        ALICE, envs, ids, [("t", "bob"), ("t", "alice")]
    )
    assert [o.outcome for o in outcomes] == [Outcome.STORED, Outcome.STORED]
    assert mismatches == []
    assert identities.list_calls == [False, False]


BOB2 = Address("t", "bob", 2)


async def test_device_removed_ends_its_sessions_and_purges_its_queue(
    relay: Relay, identities: FakeIdentities
) -> None:
    identities.keys[BOB2] = os.urandom(32)
    await relay.send(ALICE, [env(b"1", to=BOB2), env(b"2", to=BOB2), env(b"for bob", to=BOB)])
    receiving = await relay.open_session(BOB2, receive=True)
    sending = await relay.open_session(BOB2, receive=False)
    other = await relay.open_session(BOB, receive=True)
    events = receiving.events()
    assert isinstance(await anext(events), Deliver)
    assert await relay.device_removed(BOB2) == 2
    assert identities.forgotten == [BOB2]
    with pytest.raises(DeviceRemoved) as info:
        await anext(events)
    assert info.value.status is Status.PERMISSION_DENIED and info.value.reason == "DEVICE_REMOVED"
    assert "t/bob/2 was removed from the device list of t/bob" in info.value.message
    with pytest.raises(DeviceRemoved):
        await sending.ended()
    assert other.end_error is None and not receiving.displaced
    for session in (receiving, sending):
        await relay.close_session(session)
    assert relay.sessions.of_device(BOB2) == []
    assert await drain(other) == [b"for bob"]  # other devices keep theirs
    # The queue is gone; the address is refused at once, even with a key still cached.
    assert (await relay._queue.read(BOB2, 0, 10, 0)).items == ()
    with pytest.raises(DeviceRemoved):
        await relay.open_session(BOB2, receive=True)
    with pytest.raises(DeviceRemoved):
        await relay.open_session(BOB2, receive=False)
    (late,) = await relay.send(ALICE, [env(b"late", to=BOB2)])
    assert late.outcome is Outcome.REJECTED and late.error is not None
    assert late.error.status is Status.NOT_FOUND
    assert await relay.device_removed(BOB2) == 0  # told twice (or by two nodes): harmless


async def test_a_removal_during_a_send_purges_what_it_stored(
    relay: Relay, identities: FakeIdentities
) -> None:
    identities.keys[BOB2] = os.urandom(32)
    queue = relay._queue
    real_append = queue.append

    async def append_then_removed(*a, **k):  # type: ignore[no-untyped-def]
        result = await real_append(*a, **k)
        await relay.device_removed(BOB2)  # the event lands while the send is in flight
        return result

    queue.append = append_then_removed  # type: ignore[method-assign]
    (res,) = await relay.send(ALICE, [env(b"racing", to=BOB2)])
    queue.append = real_append  # type: ignore[method-assign]
    assert res.outcome is Outcome.STORED  # accepted before the removal was known
    assert (await queue.read(BOB2, 0, 10, 0)).items == ()


async def test_request_checks_come_before_any_device_list_lookup(
    relay: Relay, identities: FakeIdentities
) -> None:
    one = [env()]
    with pytest.raises(LimitExceeded, match="1001 envelopes") as info:
        await relay.send_checked(ALICE, [env() for _ in range(1001)], [1] * 1001, [("t", "bob")])
    assert info.value.limit == "max_batch_envelopes"
    many = [("t", f"u{i}") for i in range(1001)]
    with pytest.raises(LimitExceeded, match="1001 complete_device_lists entries"):
        await relay.send_checked(ALICE, one, [1], many)
    with pytest.raises(PermissionDenied, match=r"complete_device_lists\[1\]\.tenant is 'other'"):
        await relay.send_checked(ALICE, one, [1], [("t", "bob"), ("other", "bob")])
    service = ServiceSender("t", "billing").address
    with pytest.raises(PermissionDenied, match="may only send within tenant 't'"):
        await relay.send_checked(service, one, [1], [("other", "bob")])
    with pytest.raises(InvalidArgument, match=r"complete_device_lists\[0\]\.user"):
        await relay.send_checked(ALICE, one, [1], [("t", "bob\n")])
    assert identities.list_calls == []  # nothing was looked up for a refused request
