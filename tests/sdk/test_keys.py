"""Unit tests of key generation: every signature verifies with relay.authproof."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from relay import authproof
from relay.model import Address
from relay.sdk.keys import Identity, Prekey, generate_one_time_prekeys, new_message_id


def test_identity_signatures_verify() -> None:
    identity = Identity.generate()
    ik, dh = identity.public_key, identity.dh_public_key
    assert len(ik) == 32 and len(dh) == 32
    assert authproof.verify(ik, identity.dh_signature(), authproof.identity_dh_transcript(dh))
    proof = identity.registration_proof("default", "bob")
    assert authproof.verify(ik, proof, authproof.registration_transcript("default", "bob", ik, dh))
    assert not authproof.verify(
        ik, proof, authproof.registration_transcript("default", "eve", ik, dh)
    )
    address = Address("default", "bob", 1)
    nonce = b"n" * 32
    sig = identity.connect_signature(nonce, "relay-1", 123, address)
    assert authproof.verify(ik, sig, authproof.connect_transcript(nonce, "relay-1", 123, address))
    assert not authproof.verify(
        ik, sig, authproof.connect_transcript(nonce, "relay-1", 124, address)
    )
    other = Identity.generate()
    assert not authproof.verify(
        other.public_key, sig, authproof.connect_transcript(nonce, "relay-1", 123, address)
    )


def test_identity_round_trips_through_private_bytes() -> None:
    identity = Identity.generate()
    again = Identity.from_private_bytes(*identity.private_bytes())
    assert again.public_key == identity.public_key
    assert again.dh_public_key == identity.dh_public_key
    assert repr(identity) == "Identity()"  # private keys never reach a log line


def test_identity_dh_key_agrees() -> None:
    identity = Identity.generate()
    peer = X25519PrivateKey.generate()
    ours = identity.dh_key.exchange(peer.public_key())
    theirs = peer.exchange(X25519PublicKey.from_public_bytes(identity.dh_public_key))
    assert ours == theirs


def test_prekeys() -> None:
    identity = Identity.generate()
    signed = Prekey.generate_signed(identity, 7)
    assert signed.key_id == 7
    assert authproof.verify(
        identity.public_key, signed.signature, authproof.signed_prekey_transcript(signed.public)
    )
    public = X25519PrivateKey.from_private_bytes(signed.private).public_key()
    assert public.public_bytes_raw() == signed.public
    one_time = generate_one_time_prekeys(8, 5)
    assert [p.key_id for p in one_time] == [8, 9, 10, 11, 12]
    assert all(p.signature == b"" for p in one_time)
    assert len({p.public for p in one_time}) == 5
    assert "private" not in repr(one_time[0])


def test_message_ids_are_random_16_bytes() -> None:
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 for i in ids)
