"""Thin wrappers over pyca/cryptography and the PQXDH key encodings.

Every function takes and returns raw bytes so that callers never touch library key
objects, and every library failure surfaces as a :class:`~.errors.CryptoError`.

Encodings (PQXDH section 2.5): ``Encode_EC`` and ``Encode_KEM`` prefix a public key
with a one-byte type, so an X25519 key can never be mistaken for an ML-KEM key (or
the other way round) in a signature or in the associated data.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay import authproof
from relay.sdk.crypto.errors import DecryptError, MalformedMessage

#: Type byte of ``Encode_EC`` for an X25519 public key (the value libsignal uses).
EC_TYPE_X25519 = 0x05
#: Type byte of ``Encode_KEM`` for an ML-KEM-1024 public key (ours; distinct from 0x05).
KEM_TYPE_MLKEM1024 = 0x0A

X25519_KEY_LEN = 32
ED25519_SIG_LEN = 64
MLKEM1024_PUBLIC_LEN = 1568
MLKEM1024_CIPHERTEXT_LEN = 1568
MLKEM1024_SEED_LEN = 64
AEAD_KEY_LEN = 32
AEAD_NONCE_LEN = 12


# --- X25519 ---------------------------------------------------------------------------


def x25519_generate() -> bytes:
    """A fresh random X25519 private key (32 raw bytes)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def x25519(private: bytes, peer_public: bytes) -> bytes:
    """X25519(private, peer_public) as in RFC 7748.

    Raises :class:`MalformedMessage` for a key of the wrong length and for a peer key of
    small order (the all-zero output that RFC 7748 section 6.1 says to check for).
    """
    if len(peer_public) != X25519_KEY_LEN:
        raise MalformedMessage(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:
        raise MalformedMessage("X25519 public key of small order") from exc


# --- Ed25519 --------------------------------------------------------------------------


def ed25519_public(private: bytes) -> bytes:
    """The Ed25519 public key (32 bytes) of a raw 32-byte private key (seed)."""
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def ed25519_sign(private: bytes, message: bytes) -> bytes:
    """Ed25519 signature (RFC 8032, 64 bytes) of ``message``."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` verifies; small-order public keys never do (relay.authproof)."""
    return authproof.verify(public, signature, message)


# --- HKDF, HMAC and the AEAD ----------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA-256 (RFC 5869); an empty ``salt`` means HashLen zero bytes."""
    return HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256 of ``data`` under ``key``."""
    return hmac.new(key, data, hashlib.sha256).digest()


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: ciphertext followed by the 16-byte tag."""
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises :class:`DecryptError` if not authentic."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag as exc:
        raise DecryptError("message authentication failed") from exc


# --- ML-KEM-1024 ----------------------------------------------------------------------


def mlkem_generate() -> bytes:
    """A fresh ML-KEM-1024 private key as its 64-byte seed (FIPS 203 ``d || z``)."""
    return mlkem.MLKEM1024PrivateKey.generate().private_bytes_raw()


def mlkem_public(seed: bytes) -> bytes:
    """The ML-KEM-1024 encapsulation key (1568 bytes) of a private seed."""
    return mlkem.MLKEM1024PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()


def mlkem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """``(shared_secret, ciphertext)`` for the ML-KEM-1024 encapsulation key ``public``."""
    if len(public) != MLKEM1024_PUBLIC_LEN:
        raise MalformedMessage(f"ML-KEM-1024 public key must be 1568 bytes, got {len(public)}")
    try:
        key = mlkem.MLKEM1024PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise MalformedMessage("invalid ML-KEM-1024 public key") from exc
    return key.encapsulate()


def mlkem_decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
    """The shared secret of ``ciphertext`` (implicit rejection: a bad one gives garbage)."""
    if len(ciphertext) != MLKEM1024_CIPHERTEXT_LEN:
        raise MalformedMessage(f"ML-KEM-1024 ciphertext must be 1568 bytes, got {len(ciphertext)}")
    return mlkem.MLKEM1024PrivateKey.from_seed_bytes(seed).decapsulate(ciphertext)


# --- PQXDH encodings ------------------------------------------------------------------


def encode_ec(public: bytes) -> bytes:
    """``Encode_EC``: type byte 0x05 followed by the 32-byte X25519 u-coordinate."""
    if len(public) != X25519_KEY_LEN:
        raise MalformedMessage(f"X25519 public key must be 32 bytes, got {len(public)}")
    return bytes([EC_TYPE_X25519]) + public


def decode_ec(encoded: bytes) -> bytes:
    """Inverse of :func:`encode_ec`; checks the type byte, the length and canonicity.

    X25519 ignores bit 255 of a public key and reduces it mod p, so several encodings
    give the same key. Honest keys are always canonical (u < 2^255 - 19); refusing the
    others keeps messages from being malleable (a flipped top bit would otherwise
    still decrypt).
    """
    if len(encoded) != 1 + X25519_KEY_LEN or encoded[0] != EC_TYPE_X25519:
        raise MalformedMessage("not an Encode_EC X25519 public key")
    if int.from_bytes(encoded[1:], "little") >= _X25519_P:
        raise MalformedMessage("non-canonical X25519 public key")
    return encoded[1:]


_X25519_P = 2**255 - 19


def encode_kem(public: bytes) -> bytes:
    """``Encode_KEM``: type byte 0x0A followed by the 1568-byte ML-KEM-1024 key."""
    if len(public) != MLKEM1024_PUBLIC_LEN:
        raise MalformedMessage(f"ML-KEM-1024 public key must be 1568 bytes, got {len(public)}")
    return bytes([KEM_TYPE_MLKEM1024]) + public


def decode_kem(encoded: bytes) -> bytes:
    """Inverse of :func:`encode_kem`; checks the type byte and the length."""
    if len(encoded) != 1 + MLKEM1024_PUBLIC_LEN or encoded[0] != KEM_TYPE_MLKEM1024:
        raise MalformedMessage("not an Encode_KEM ML-KEM-1024 public key")
    return encoded[1:]
