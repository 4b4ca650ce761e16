"""PQXDH: agreement, signature checks, identity binding and the initial message."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.sdk.crypto import pqxdh
from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.bundle import InitialMessage, PrekeyBundle
from relay.sdk.crypto.errors import BadSignature, MalformedMessage, UnknownPrekey
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.keys import Identity


def _bob(one_time_ec: int = 2, one_time_pq: int = 2) -> DevicePrekeys:
    return DevicePrekeys.generate(Identity.generate(), one_time_ec, one_time_pq)


@pytest.mark.parametrize(("ec", "pq"), [(2, 2), (0, 2), (2, 0), (0, 0)])
def test_both_sides_agree_with_and_without_one_time_keys(ec: int, pq: int) -> None:
    alice, bob = Identity.generate(), _bob(ec, pq)
    bundle = bob.bundle()
    assert (bundle.one_time_prekey is None) == (ec == 0)
    assert bundle.pq_prekey.last_resort == (pq == 0)
    sk, ad, message = pqxdh.initiate(alice, bundle)
    assert len(sk) == 32
    assert len(ad) == 130
    assert ad.startswith(p.encode_ec(alice.dh_public_key) + alice.public_key)
    assert ad.endswith(p.encode_ec(bob.identity.dh_public_key) + bob.identity.public_key)
    assert pqxdh.respond(bob, InitialMessage.from_bytes(message.to_bytes())) == (sk, ad)


def test_kdf_matches_the_spec_recomputed_independently() -> None:
    """SK = HKDF(0^32, F || DH1 || DH2 || DH3 || DH4 || SS, info), recomputed here."""
    alice, bob = Identity.generate(), _bob()
    bundle = bob.bundle()
    assert bundle.one_time_prekey is not None
    ek = p.x25519_generate()
    sk, _, message = pqxdh.initiate(alice, bundle, ephemeral=ek)

    def dh(private: bytes, public: bytes) -> bytes:
        key = X25519PrivateKey.from_private_bytes(private)
        return key.exchange(X25519PublicKey.from_public_bytes(public))

    ik_a = alice.private_bytes()[1]
    spk = bundle.signed_prekey.public
    ss = p.mlkem_decapsulate(bob.pq_private(message.pq_prekey_id), message.kem_ciphertext)
    ikm = b"\xff" * 32 + dh(ik_a, spk) + dh(ek, bob.identity.dh_public_key) + dh(ek, spk)
    ikm += dh(ek, bundle.one_time_prekey.public) + ss
    info = b"e2ee-relay/pqxdh/v1_CURVE25519_SHA-256_ML-KEM-1024"
    assert info == pqxdh.PQXDH_INFO
    assert sk == HKDF(hashes.SHA256(), 32, b"\x00" * 32, info).derive(ikm)


def _corrupt(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 0x80]) + signature[1:]


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("signed_prekey", "signed prekey"),
        ("pq_prekey", "one-time PQ prekey"),
        ("identity", "identity DH key"),
    ],
)
def test_bad_signature_is_rejected_naming_the_key(target: str, name: str) -> None:
    bundle = _bob().bundle()
    part = getattr(bundle, target)
    field = "dh_signature" if target == "identity" else "signature"
    bad = dataclasses.replace(part, **{field: _corrupt(getattr(part, field))})
    with pytest.raises(BadSignature, match=name) as info:
        pqxdh.initiate(Identity.generate(), dataclasses.replace(bundle, **{target: bad}))
    assert info.value.key == name


def test_last_resort_prekey_signature_is_checked() -> None:
    bundle = _bob(one_time_pq=0).bundle()
    bad = dataclasses.replace(bundle.pq_prekey, signature=_corrupt(bundle.pq_prekey.signature))
    with pytest.raises(BadSignature, match="last-resort PQ prekey"):
        pqxdh.initiate(Identity.generate(), dataclasses.replace(bundle, pq_prekey=bad))


def test_signature_for_one_key_type_does_not_vouch_for_another() -> None:
    """The signed prekey's signature cannot be moved onto a PQ key or the identity."""
    bob = _bob()
    bundle = bob.bundle()
    moved = dataclasses.replace(bundle.pq_prekey, signature=bundle.signed_prekey.signature)
    with pytest.raises(BadSignature):
        pqxdh.initiate(Identity.generate(), dataclasses.replace(bundle, pq_prekey=moved))
    swapped = dataclasses.replace(
        bundle.signed_prekey,
        public=bob.identity.dh_public_key,
        signature=bundle.identity.dh_signature,
    )
    with pytest.raises(BadSignature, match="signed prekey"):
        pqxdh.initiate(Identity.generate(), dataclasses.replace(bundle, signed_prekey=swapped))


def test_different_identity_gives_different_secret() -> None:
    bob = _bob(one_time_ec=0, one_time_pq=0)  # same last-resort keys for both initiators
    bundle = bob.bundle()
    ek = p.x25519_generate()
    one = pqxdh.initiate(Identity.generate(), bundle, ephemeral=ek)
    two = pqxdh.initiate(Identity.generate(), bundle, ephemeral=ek)
    assert one.shared_secret != two.shared_secret
    assert one.associated_data != two.associated_data


def test_responder_rejects_an_identity_claim_without_its_dh_key() -> None:
    """Mallory cannot pair Alice's signing key with her own X25519 identity key."""
    alice, mallory, bob = Identity.generate(), Identity.generate(), _bob()
    _, _, message = pqxdh.initiate(mallory, bob.bundle())
    claimed = dataclasses.replace(message.identity, signing_key=alice.public_key)
    with pytest.raises(BadSignature, match="identity DH key"):
        pqxdh.respond(bob, dataclasses.replace(message, identity=claimed))


def test_one_time_keys_are_consumed_and_last_resort_stays() -> None:
    bob = _bob(one_time_ec=1, one_time_pq=1)
    _, _, message = pqxdh.initiate(Identity.generate(), bob.bundle())
    assert message.one_time_prekey_id is not None
    bob.consume(message.pq_prekey_id, message.one_time_prekey_id)
    with pytest.raises(UnknownPrekey):
        pqxdh.respond(bob, message)
    later: PrekeyBundle = bob.bundle()
    assert later.one_time_prekey is None
    assert later.pq_prekey.last_resort
    sk, ad, msg = pqxdh.initiate(Identity.generate(), later)
    bob.consume(msg.pq_prekey_id, msg.one_time_prekey_id)
    assert pqxdh.respond(bob, msg) == (sk, ad)  # the last-resort key is reusable


def test_initial_message_parsing_is_strict() -> None:
    _, _, message = pqxdh.initiate(Identity.generate(), _bob().bundle())
    data = message.to_bytes()
    assert InitialMessage.from_bytes(data) == message
    for bad in (data[:-1], data + b"\x00", b"\x02" + data[1:], data[:40]):
        with pytest.raises(MalformedMessage):
            InitialMessage.from_bytes(bad)
