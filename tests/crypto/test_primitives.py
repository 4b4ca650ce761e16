"""Known-answer tests for the wrapped primitives, through relay.sdk.crypto.primitives.

Vectors come from the ``cryptography_vectors`` package where it ships them (RFC 7748
section 5.2, the RFC 8032 / ed25519 reference ``sign.input`` list whose first three
lines are RFC 8032 section 7.1 TESTs 1-3, RFC 5869 appendix A.1-A.3); RFC 7748's
iterated and section 6.1 Diffie-Hellman vectors are embedded from the RFC text.
"""

from __future__ import annotations

from pathlib import Path

import cryptography_vectors
import pytest

from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.errors import DecryptError, MalformedMessage

VECTORS = Path(cryptography_vectors.__file__).parent


def _blocks(path: Path) -> list[dict[str, str]]:
    """``KEY = value`` records, each starting at its ``COUNT`` line."""
    blocks: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if line.startswith("#") or not sep:
            continue
        if key.strip() == "COUNT":
            blocks.append({})
        blocks[-1][key.strip()] = value.strip()
    return blocks


X25519_FILE = _blocks(VECTORS / "asymmetric/X25519/rfc7748.txt")
HKDF_FILE = _blocks(VECTORS / "KDF/rfc-5869-HKDF-SHA256.txt")
ED25519_LINES = (VECTORS / "asymmetric/Ed25519/sign.input").read_text().splitlines()


def test_vector_files_are_not_empty() -> None:
    assert len(X25519_FILE) == 3
    assert len(HKDF_FILE) == 3
    assert len(ED25519_LINES) == 1024


@pytest.mark.parametrize("vector", X25519_FILE, ids=lambda v: v["COUNT"])
def test_x25519_rfc7748_section_5_2(vector: dict[str, str]) -> None:
    out = p.x25519(bytes.fromhex(vector["INPUT_SCALAR"]), bytes.fromhex(vector["INPUT_U"]))
    assert out.hex() == vector["OUTPUT_U"]


def test_x25519_rfc7748_iterated_1000() -> None:
    k = u = bytes.fromhex("09" + "00" * 31)
    for _ in range(1000):
        k, u = p.x25519(k, u), k
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_x25519_rfc7748_section_6_1() -> None:
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    a_pub = p.x25519_public(a)
    b_pub = p.x25519_public(b)
    assert a_pub.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert b_pub.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert p.x25519(a, b_pub).hex() == p.x25519(b, a_pub).hex() == shared


def test_x25519_rejects_small_order_and_bad_length() -> None:
    with pytest.raises(MalformedMessage):
        p.x25519(p.x25519_generate(), b"\x00" * 32)
    with pytest.raises(MalformedMessage):
        p.x25519(p.x25519_generate(), b"\x09" * 31)


@pytest.mark.parametrize("line", ED25519_LINES, ids=range(len(ED25519_LINES)))
def test_ed25519_rfc8032(line: str) -> None:
    sk_pk, pk, msg, sig_msg, _ = line.split(":")
    seed, public, message = bytes.fromhex(sk_pk)[:32], bytes.fromhex(pk), bytes.fromhex(msg)
    signature = bytes.fromhex(sig_msg)[:64]
    assert p.ed25519_public(seed) == public
    assert p.ed25519_sign(seed, message) == signature
    assert p.ed25519_verify(public, signature, message)
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    assert not p.ed25519_verify(public, forged, message)
    assert not p.ed25519_verify(public, signature, message + b"x")


@pytest.mark.parametrize("vector", HKDF_FILE, ids=lambda v: v["COUNT"])
def test_hkdf_sha256_rfc5869(vector: dict[str, str]) -> None:
    okm = p.hkdf_sha256(
        bytes.fromhex(vector["IKM"]),
        bytes.fromhex(vector["salt"]),
        bytes.fromhex(vector["info"]),
        int(vector["L"]),
    )
    assert okm.hex() == vector["OKM"]


def test_aead_round_trip_and_rejects_tampering() -> None:
    key, nonce = b"k" * 32, b"n" * 12
    sealed = p.aead_encrypt(key, nonce, b"hello", b"ad")
    assert p.aead_decrypt(key, nonce, sealed, b"ad") == b"hello"
    with pytest.raises(DecryptError):
        p.aead_decrypt(key, nonce, sealed, b"AD")


def test_mlkem_round_trip_and_lengths() -> None:
    seed = p.mlkem_generate()
    public = p.mlkem_public(seed)
    secret, ciphertext = p.mlkem_encapsulate(public)
    assert len(public) == len(ciphertext) == 1568
    assert len(secret) == 32
    assert p.mlkem_decapsulate(seed, ciphertext) == secret
    # Implicit rejection: a modified ciphertext yields an unrelated secret, not an error.
    assert p.mlkem_decapsulate(seed, bytes([ciphertext[0] ^ 1]) + ciphertext[1:]) != secret
    with pytest.raises(MalformedMessage):
        p.mlkem_decapsulate(seed, ciphertext[:-1])


def test_encodings_are_typed_and_distinct() -> None:
    ec = p.x25519_public(p.x25519_generate())
    kem = p.mlkem_public(p.mlkem_generate())
    assert p.encode_ec(ec)[0] == p.EC_TYPE_X25519 != p.KEM_TYPE_MLKEM1024 == p.encode_kem(kem)[0]
    assert p.decode_ec(p.encode_ec(ec)) == ec
    assert p.decode_kem(p.encode_kem(kem)) == kem
    with pytest.raises(MalformedMessage):
        p.decode_ec(bytes([p.KEM_TYPE_MLKEM1024]) + ec)
    with pytest.raises(MalformedMessage):
        p.decode_kem(bytes([p.EC_TYPE_X25519]) + kem)
    with pytest.raises(MalformedMessage):
        p.encode_kem(ec)
