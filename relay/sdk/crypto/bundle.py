"""Public PQXDH key material: what a device publishes and what an initiator sends.

Signatures (all Ed25519, by the device's identity signing key, over transcripts that
start with a distinct label as in :mod:`relay.authproof`):

* the X25519 identity key: ``authproof.identity_dh_transcript(IK_dh)``;
* a signed X25519 prekey: ``authproof.signed_prekey_transcript(SPK)`` (the transcript
  the SDK already uploads, so existing signed prekeys stay valid);
* an ML-KEM-1024 prekey, one-time or last-resort:
  ``authproof.pq_prekey_transcript(PQPK)`` over ``Encode_KEM(PQPK)`` (shared with the key
  directory, which verifies it on upload; re-exported here as :func:`pq_prekey_transcript`).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay import authproof
from relay.authproof import pq_prekey_transcript
from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.errors import BadSignature, MalformedMessage
from relay.sdk.crypto.wire import Reader, field, u32

#: Version byte that starts an encoded :class:`InitialMessage`.
INITIAL_MESSAGE_VERSION = 1


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """A device's public identity: Ed25519 key, X25519 key and the signature binding them."""

    signing_key: bytes
    dh_key: bytes
    dh_signature: bytes

    def verify(self) -> None:
        """Raise :class:`BadSignature` unless the signing key vouches for the DH key."""
        transcript = authproof.identity_dh_transcript(self.dh_key)
        if not p.ed25519_verify(self.signing_key, self.dh_signature, transcript):
            raise BadSignature("identity DH key")

    def encode(self) -> bytes:
        """``Encode_EC(IK_dh) || IK_sig``: this identity's part of the associated data."""
        return p.encode_ec(self.dh_key) + self.signing_key


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    """A signed X25519 prekey."""

    key_id: int
    public: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class PqPrekey:
    """A signed ML-KEM-1024 prekey: one-time, or the last-resort key when the pool is empty."""

    key_id: int
    public: bytes
    signature: bytes
    last_resort: bool


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    """An unsigned one-time X25519 prekey."""

    key_id: int
    public: bytes


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What the key directory hands an initiator for one device of the responder."""

    identity: PublicIdentity
    signed_prekey: SignedPrekey
    pq_prekey: PqPrekey
    one_time_prekey: OneTimePrekey | None = None

    def verify(self) -> None:
        """Check every signature, raising :class:`BadSignature` naming the first bad key."""
        self.identity.verify()
        spk = self.signed_prekey
        if not p.ed25519_verify(
            self.identity.signing_key,
            spk.signature,
            authproof.signed_prekey_transcript(spk.public),
        ):
            raise BadSignature("signed prekey")
        pq = self.pq_prekey
        if not p.ed25519_verify(
            self.identity.signing_key, pq.signature, pq_prekey_transcript(pq.public)
        ):
            raise BadSignature("last-resort PQ prekey" if pq.last_resort else "one-time PQ prekey")


@dataclass(frozen=True, slots=True)
class InitialMessage:
    """The PQXDH initial message header that precedes the first ratchet message."""

    identity: PublicIdentity
    ephemeral_key: bytes
    kem_ciphertext: bytes
    signed_prekey_id: int
    pq_prekey_id: int
    one_time_prekey_id: int | None

    def to_bytes(self) -> bytes:
        """The wire encoding (see docs/protocol.md)."""
        opk = b"\x00" if self.one_time_prekey_id is None else b"\x01" + u32(self.one_time_prekey_id)
        return (
            bytes([INITIAL_MESSAGE_VERSION])
            + field(self.identity.signing_key)
            + field(p.encode_ec(self.identity.dh_key))
            + field(self.identity.dh_signature)
            + field(p.encode_ec(self.ephemeral_key))
            + field(self.kem_ciphertext)
            + u32(self.signed_prekey_id)
            + u32(self.pq_prekey_id)
            + opk
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InitialMessage:
        """Parse :meth:`to_bytes` strictly; raise :class:`MalformedMessage` otherwise."""
        reader = Reader(data, "PQXDH initial message")
        if reader.take(1) != bytes([INITIAL_MESSAGE_VERSION]):
            raise MalformedMessage("PQXDH initial message: unknown version")
        identity = PublicIdentity(
            signing_key=reader.field(32),
            dh_key=p.decode_ec(reader.field(1 + p.X25519_KEY_LEN)),
            dh_signature=reader.field(p.ED25519_SIG_LEN),
        )
        ephemeral = p.decode_ec(reader.field(1 + p.X25519_KEY_LEN))
        ciphertext = reader.field(p.MLKEM1024_CIPHERTEXT_LEN)
        spk_id, pq_id = reader.u32(), reader.u32()
        flag = reader.take(1)
        if flag == b"\x00":
            opk_id: int | None = None
        elif flag == b"\x01":
            opk_id = reader.u32()
        else:
            raise MalformedMessage("PQXDH initial message: bad one-time prekey flag")
        reader.end()
        return cls(identity, ephemeral, ciphertext, spk_id, pq_id, opk_id)
