"""Device key material: the identity, signed and one-time prekeys.

Everything here is pure computation (no I/O). Private key bytes leave this module only
to be stored in the device's state file; they are never logged or printed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from relay import authproof
from relay.model import Address

#: One-time prekeys a new device uploads with its registration.
DEFAULT_ONE_TIME_PREKEYS = 100


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


@dataclass(frozen=True, slots=True)
class Identity:
    """A device's long-term keys: Ed25519 for signatures, X25519 for Diffie-Hellman."""

    signing_key: Ed25519PrivateKey = field(repr=False)
    dh_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, signing: bytes, dh: bytes) -> Identity:
        """Rebuild an identity from the raw 32-byte private keys of :meth:`private_bytes`."""
        return cls(
            Ed25519PrivateKey.from_private_bytes(signing),
            X25519PrivateKey.from_private_bytes(dh),
        )

    def private_bytes(self) -> tuple[bytes, bytes]:
        """The raw private keys ``(signing, dh)``, for the state file only."""
        return _raw_private(self.signing_key), _raw_private(self.dh_key)

    @property
    def public_key(self) -> bytes:
        """The Ed25519 public key (32 bytes): the device's signing identity."""
        return self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def dh_public_key(self) -> bytes:
        """The X25519 public key (32 bytes): the device's Diffie-Hellman identity."""
        return self.dh_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, transcript: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``transcript`` (see relay.authproof)."""
        return self.signing_key.sign(transcript)

    def dh_signature(self) -> bytes:
        """The identity key's signature vouching for :attr:`dh_public_key`."""
        return self.sign(authproof.identity_dh_transcript(self.dh_public_key))

    def registration_proof(self, tenant: str, user: str) -> bytes:
        """Signature over the registration transcript: proves possession of the key."""
        return self.sign(
            authproof.registration_transcript(tenant, user, self.public_key, self.dh_public_key)
        )

    def link_proof(self, tenant: str, user: str, link_key: bytes) -> bytes:
        """Signature over a link request: proves possession of the key asking to join."""
        return self.sign(
            authproof.link_request_transcript(
                tenant, user, self.public_key, self.dh_public_key, link_key
            )
        )

    def connect_signature(
        self, nonce: bytes, node_id: str, server_time_ms: int, address: Address
    ) -> bytes:
        """Answer to a Connect challenge for ``address``."""
        return self.sign(authproof.connect_transcript(nonce, node_id, server_time_ms, address))


@dataclass(frozen=True, slots=True)
class Prekey:
    """An X25519 prekey pair with its id; ``signature`` is set for a signed prekey."""

    key_id: int
    private: bytes = field(repr=False)
    public: bytes
    signature: bytes = b""

    @classmethod
    def generate(cls, key_id: int) -> Prekey:
        """A fresh unsigned (one-time) prekey."""
        key = X25519PrivateKey.generate()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(key_id, _raw_private(key), public)

    @classmethod
    def generate_signed(cls, identity: Identity, key_id: int) -> Prekey:
        """A fresh signed prekey, vouched for by ``identity``."""
        unsigned = cls.generate(key_id)
        signature = identity.sign(authproof.signed_prekey_transcript(unsigned.public))
        return cls(key_id, unsigned.private, unsigned.public, signature)


def generate_one_time_prekeys(first_id: int, count: int) -> list[Prekey]:
    """``count`` one-time prekeys with consecutive ids starting at ``first_id``."""
    return [Prekey.generate(first_id + i) for i in range(count)]


def new_message_id() -> bytes:
    """A random 16-byte message id."""
    return secrets.token_bytes(16)
