"""Unit tests of the E2EE codec on real device state files (no network).

The key directory is replaced by the responder's own DevicePrekeys (its bundle is what
the directory would hand out) and a dict of identity keys.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.model import Address, registration_id
from relay.sdk.crypto.errors import CryptoError, DuplicateMessage
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.directory import DeviceBundle
from relay.sdk.e2ee import PREKEY_MESSAGE, RATCHET_MESSAGE, E2eeCodec, NoSession, UntrustedIdentity
from relay.sdk.keys import Identity
from relay.sdk.state import DeviceState

ALICE = Address("t", "alice", 1)
BOB = Address("t", "bob", 1)


class Device:
    """A device with a state file, its prekeys and a codec."""

    def __init__(self, home: Path, address: Address, directory: dict[Address, bytes]) -> None:
        self.state = DeviceState.open(home)
        self.identity = Identity.generate()
        self.prekeys = DevicePrekeys.generate(self.identity, one_time_ec=3, one_time_pq=3)
        self.state.save_identity(self.identity)
        self.state.save_address(address)
        self.state.save_device_prekeys(self.prekeys)
        self.address = address
        directory[address] = self.identity.public_key
        self.used = 0

        async def lookup(device: Address) -> bytes | None:
            return directory.get(device)

        self.codec = E2eeCodec(self.state, self.identity, lookup, on_prekeys_used=self._used)

    def _used(self) -> None:
        self.used += 1

    def bundle(self) -> DeviceBundle:
        stored = self.state.device_prekeys()
        assert stored is not None
        return DeviceBundle(
            self.address, registration_id(self.identity.public_key), stored.bundle()
        )

    async def open(self, sender: Address, content: bytes) -> bytes:
        await self.codec.prepare([(sender, content)])
        return self.codec.open(sender, content)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Device, Device]]:
    directory: dict[Address, bytes] = {}
    alice = Device(tmp_path / "a", ALICE, directory)
    bob = Device(tmp_path / "b", BOB, directory)
    yield alice, bob
    alice.state.close()
    bob.state.close()


async def test_prekey_message_then_ratchet_messages(pair: tuple[Device, Device]) -> None:
    alice, bob = pair
    with pytest.raises(NoSession):
        alice.codec.seal(BOB, b"x")
    alice.codec.start_session(bob.bundle())
    first = alice.codec.seal(BOB, b"one")
    second = alice.codec.seal(BOB, b"two")
    # Until bob answers, every message carries the PQXDH header.
    assert first[0] == second[0] == PREKEY_MESSAGE
    assert await bob.open(ALICE, second) == b"two"  # out of order
    assert await bob.open(ALICE, first) == b"one"
    assert bob.used == 1  # only the first prekey message made a session
    reply = bob.codec.seal(ALICE, b"three")
    assert reply[0] == RATCHET_MESSAGE
    assert await alice.open(BOB, reply) == b"three"
    assert alice.codec.seal(BOB, b"four")[0] == RATCHET_MESSAGE  # answered: header dropped


async def test_one_time_prekeys_are_consumed_durably(pair: tuple[Device, Device]) -> None:
    alice, bob = pair
    bundle = bob.bundle()
    assert bundle.bundle.one_time_prekey is not None
    pq_id, ec_id = bundle.bundle.pq_prekey.key_id, bundle.bundle.one_time_prekey.key_id
    alice.codec.start_session(bundle)
    await bob.open(ALICE, alice.codec.seal(BOB, b"hi"))
    reopened = DeviceState.open(bob.state.path.parent)
    stored = reopened.device_prekeys()
    reopened.close()
    assert stored is not None
    assert ec_id not in stored.one_time_ec and pq_id not in stored.one_time_pq
    assert stored.signed and stored.last_resort  # long-term keys stay


async def test_replay_is_rejected_and_changes_nothing(pair: tuple[Device, Device]) -> None:
    alice, bob = pair
    alice.codec.start_session(bob.bundle())
    message = alice.codec.seal(BOB, b"once")
    assert await bob.open(ALICE, message) == b"once"
    before = bob.state.session_record(ALICE)
    with pytest.raises(DuplicateMessage):
        await bob.open(ALICE, message)
    assert bob.state.session_record(ALICE) == before
    follow = alice.codec.seal(BOB, b"after")
    assert await bob.open(ALICE, follow) == b"after"


async def test_every_bit_flip_of_a_ratchet_message_is_rejected(
    pair: tuple[Device, Device],
) -> None:
    alice, bob = pair
    alice.codec.start_session(bob.bundle())
    await bob.open(ALICE, alice.codec.seal(BOB, b"hello"))
    await alice.open(BOB, bob.codec.seal(ALICE, b"answer"))
    message = alice.codec.seal(BOB, b"secret payload")
    assert message[0] == RATCHET_MESSAGE
    before = bob.state.session_record(ALICE)
    for bit in range(len(message) * 8):
        tampered = bytearray(message)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CryptoError):
            await bob.open(ALICE, bytes(tampered))
    assert bob.state.session_record(ALICE) == before
    assert await bob.open(ALICE, message) == b"secret payload"


async def test_bit_flips_of_a_prekey_message_are_rejected(pair: tuple[Device, Device]) -> None:
    """Every bit outside the ML-KEM ciphertext, and 200 random bits inside it."""
    alice, bob = pair
    alice.codec.start_session(bob.bundle())
    message = alice.codec.seal(BOB, b"first words")
    kem_at = message.find(b"\x00\x00\x06\x20")  # the 1568-byte ciphertext's length prefix
    assert kem_at > 0
    kem_bits = range((kem_at + 4) * 8, (kem_at + 4 + 1568) * 8)
    rng = random.Random(7)
    bits = [b for b in range(len(message) * 8) if b not in kem_bits]
    bits += rng.sample(kem_bits, 200)
    for bit in bits:
        tampered = bytearray(message)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CryptoError):
            await bob.open(ALICE, bytes(tampered))
    assert bob.state.session_record(ALICE) is None
    assert bob.used == 0
    assert await bob.open(ALICE, message) == b"first words"


async def test_identity_not_in_directory_is_refused(tmp_path: Path) -> None:
    directory: dict[Address, bytes] = {}
    alice = Device(tmp_path / "a", ALICE, directory)
    bob = Device(tmp_path / "b", BOB, directory)
    alice.codec.start_session(bob.bundle())
    message = alice.codec.seal(BOB, b"hi")
    directory[ALICE] = Identity.generate().public_key  # the directory says otherwise
    with pytest.raises(UntrustedIdentity):
        await bob.open(ALICE, message)
    directory[ALICE] = alice.identity.public_key
    assert await bob.open(ALICE, message) == b"hi"
    alice.state.close()
    bob.state.close()


async def test_crossing_session_setups_converge(pair: tuple[Device, Device]) -> None:
    alice, bob = pair
    alice.codec.start_session(bob.bundle())
    bob.codec.start_session(alice.bundle())
    a1 = alice.codec.seal(BOB, b"from alice")
    b1 = bob.codec.seal(ALICE, b"from bob")
    assert await bob.open(ALICE, a1) == b"from alice"
    assert await alice.open(BOB, b1) == b"from bob"
    # Each now sends on the session the other made; both sides still decrypt.
    for i in range(3):
        assert await bob.open(ALICE, alice.codec.seal(BOB, b"a%d" % i)) == b"a%d" % i
        assert await alice.open(BOB, bob.codec.seal(ALICE, b"b%d" % i)) == b"b%d" % i


async def test_sessions_survive_a_restart(pair: tuple[Device, Device], tmp_path: Path) -> None:
    alice, bob = pair
    alice.codec.start_session(bob.bundle())
    await bob.open(ALICE, alice.codec.seal(BOB, b"hi"))
    skipped = [alice.codec.seal(BOB, b"skipped %d" % i) for i in range(3)]
    await bob.open(ALICE, alice.codec.seal(BOB, b"latest"))
    bob.state.close()
    state = DeviceState.open(tmp_path / "b")

    async def lookup(device: Address) -> bytes | None:
        return alice.identity.public_key

    codec = E2eeCodec(state, bob.identity, lookup)
    # Skipped message keys were persisted with the session.
    assert [codec.open(ALICE, m) for m in reversed(skipped)] == [
        b"skipped 2",
        b"skipped 1",
        b"skipped 0",
    ]
    bob.state = state
