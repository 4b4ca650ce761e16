"""Double Ratchet: conversations, ordering, bounds, replay, tampering, persistence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sdk.crypto import ratchet as ratchet_module
from relay.sdk.crypto.errors import (
    CryptoError,
    DuplicateMessage,
    MalformedMessage,
    TooManySkipped,
)
from relay.sdk.crypto.ratchet import MAX_SKIP, Header, Ratchet
from tests.crypto.support import session_pair


def test_long_two_way_conversation() -> None:
    alice, bob = session_pair()
    rng = random.Random(7)
    sender, receiver = alice, bob
    for turn in range(60):
        for i in range(rng.randint(1, 4)):
            text = f"turn {turn} message {i}".encode()
            assert receiver.decrypt(sender.encrypt(text)) == text
        sender, receiver = receiver, sender
    assert alice.skipped_count == bob.skipped_count == 0


def test_ciphertexts_differ_for_equal_plaintexts() -> None:
    alice, _ = session_pair()
    assert alice.encrypt(b"same")[40:] != alice.encrypt(b"same")[40:]


def test_responder_cannot_send_first() -> None:
    _, bob = session_pair()
    with pytest.raises(CryptoError):
        bob.encrypt(b"too early")


@settings(max_examples=40, deadline=None)
@given(first=st.integers(1, 6), second=st.integers(1, 6), seed=st.randoms())
def test_any_delivery_order_across_a_ratchet_step(
    first: int, second: int, seed: random.Random
) -> None:
    """Batch 1, a reply, batch 2 on a new chain: any order of the rest decrypts once each."""
    alice, bob = session_pair()
    batch = [(f"a{i}".encode(), alice.encrypt(f"a{i}".encode())) for i in range(first)]
    assert bob.decrypt(batch[0][1]) == b"a0"
    assert alice.decrypt(bob.encrypt(b"reply")) == b"reply"
    batch += [(f"b{i}".encode(), alice.encrypt(f"b{i}".encode())) for i in range(second)]
    pending = batch[1:]
    seed.shuffle(pending)
    for text, message in pending:
        assert bob.decrypt(message) == text
    assert bob.skipped_count == 0
    for _, message in batch:
        with pytest.raises(CryptoError):
            bob.decrypt(message)


def test_beyond_max_skip_is_rejected_and_state_kept() -> None:
    alice, bob = session_pair()
    messages = [alice.encrypt(b"%d" % i) for i in range(MAX_SKIP + 2)]
    before = bob.to_bytes()
    with pytest.raises(TooManySkipped):
        bob.decrypt(messages[MAX_SKIP + 1])
    assert bob.to_bytes() == before
    assert bob.decrypt(messages[MAX_SKIP]) == b"%d" % MAX_SKIP  # exactly MAX_SKIP skipped
    assert bob.skipped_count == MAX_SKIP
    assert bob.decrypt(messages[3]) == b"3"


def test_previous_chain_length_beyond_max_skip_is_rejected() -> None:
    alice, bob = session_pair()
    assert bob.decrypt(alice.encrypt(b"x")) == b"x"
    for _ in range(MAX_SKIP + 2):
        alice.encrypt(b"lost")
    assert alice.decrypt(bob.encrypt(b"y")) == b"y"
    with pytest.raises(TooManySkipped):
        bob.decrypt(alice.encrypt(b"new chain, PN too far ahead"))


def test_stored_skipped_keys_are_capped_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratchet_module, "MAX_STORED_SKIPPED", 5)
    alice, bob = session_pair()
    messages = [alice.encrypt(b"%d" % i) for i in range(9)]
    assert bob.decrypt(messages[8]) == b"8"
    assert bob.skipped_count == 5
    with pytest.raises(CryptoError):
        bob.decrypt(messages[0])  # dropped
    assert bob.decrypt(messages[3]) == b"3"  # kept


def test_duplicates_and_replays_are_rejected() -> None:
    alice, bob = session_pair()
    m0, m1, m2 = (alice.encrypt(b"%d" % i) for i in range(3))
    assert bob.decrypt(m0) == b"0"
    with pytest.raises(DuplicateMessage):
        bob.decrypt(m0)
    assert bob.decrypt(m2) == b"2"
    assert bob.decrypt(m1) == b"1"  # from the skipped keys
    with pytest.raises(DuplicateMessage):
        bob.decrypt(m1)
    assert alice.decrypt(bob.encrypt(b"r")) == b"r"
    assert bob.decrypt(alice.encrypt(b"3")) == b"3"  # Bob is on a new receiving chain
    for old in (m0, m1, m2):
        with pytest.raises(CryptoError):
            bob.decrypt(old)


def _assert_every_bit_flip_rejected(receiver: Ratchet, message: bytes) -> None:
    before = receiver.to_bytes()
    for bit in range(len(message) * 8):
        tampered = bytearray(message)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CryptoError):
            receiver.decrypt(bytes(tampered))
        assert receiver.to_bytes() == before, f"state changed by flipping bit {bit}"


def test_every_bit_flip_is_rejected_and_state_unchanged() -> None:
    """Exhaustive over header and ciphertext for: a first message (which would ratchet),
    a message from the stored skipped keys, and the next message of the current chain."""
    alice, bob = session_pair()
    first, second, third, fourth = (alice.encrypt(b"hi") for _ in range(4))
    assert len(first) == 40 + 2 + 16
    _assert_every_bit_flip_rejected(bob, first)
    assert bob.decrypt(first) == b"hi"
    assert bob.decrypt(third) == b"hi"
    _assert_every_bit_flip_rejected(bob, second)  # key held in the skipped store
    assert bob.decrypt(second) == b"hi"
    _assert_every_bit_flip_rejected(bob, fourth)  # next on the receiving chain
    assert bob.decrypt(fourth) == b"hi"


def test_truncated_messages_are_malformed() -> None:
    alice, bob = session_pair()
    message = alice.encrypt(b"")
    with pytest.raises(MalformedMessage):
        bob.decrypt(message[:-1])
    assert bob.decrypt(message) == b""


def test_state_round_trips_mid_conversation() -> None:
    alice, bob = session_pair()
    pending = [alice.encrypt(b"%d" % i) for i in range(4)]
    assert bob.decrypt(pending[3]) == b"3"
    assert alice.decrypt(bob.encrypt(b"r0")) == b"r0"
    late = bob.encrypt(b"r1")
    saved_alice, saved_bob = alice.to_bytes(), bob.to_bytes()
    alice, bob = Ratchet.from_bytes(saved_alice), Ratchet.from_bytes(saved_bob)
    assert (alice.to_bytes(), bob.to_bytes()) == (saved_alice, saved_bob)
    assert bob.skipped_count == 3
    assert [bob.decrypt(m) for m in pending[:3]] == [b"0", b"1", b"2"]
    assert alice.decrypt(late) == b"r1"
    assert bob.decrypt(alice.encrypt(b"after")) == b"after"


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"[]", b'{"version":2}', b"\xff", b'{"version":1,"dhs":"zz"}']
)
def test_bad_state_is_rejected(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        Ratchet.from_bytes(data)


def test_header_layout() -> None:
    alice, _ = session_pair()
    message = alice.encrypt(b"x")
    header = Header.decode(message)
    assert (header.pn, header.n) == (0, 0)
    assert header.encode() == message[:40]
    assert Header.decode(alice.encrypt(b"y")).n == 1
