"""PQXDH session setup (Signal's specification, revision 3) over X25519 and ML-KEM-1024.

``SK = HKDF-SHA-256(salt = 32 zero bytes, IKM = F || DH1 || DH2 || DH3 [|| DH4] || SS,
info = PQXDH_INFO, L = 32)`` with ``F`` = 32 0xFF bytes and

* DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B),
  DH4 = DH(EK_A, OPK_B) when a one-time X25519 prekey was used;
* (CT, SS) = PQKEM-ENC(PQPK_B).

Identities here are split (Ed25519 for signing, X25519 for DH, bound by a signature)
where the spec uses one XEdDSA key, so ``AD = Encode(IK_A) || Encode(IK_B)`` encodes both
halves of each: ``Encode_EC(IK_dh) || IK_sig`` (130 bytes in all).
"""

from __future__ import annotations

from typing import NamedTuple

from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.bundle import (
    InitialMessage,
    OneTimePrekey,
    PqPrekey,
    PrekeyBundle,
    PublicIdentity,
    SignedPrekey,
)
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.keys import Identity

__all__ = [
    "PQXDH_INFO",
    "InitialMessage",
    "Initiation",
    "OneTimePrekey",
    "PqPrekey",
    "PrekeyBundle",
    "PublicIdentity",
    "SignedPrekey",
    "initiate",
    "respond",
]

#: HKDF info: the application, curve, hash and KEM, as the spec asks.
PQXDH_INFO = b"e2ee-relay/pqxdh/v1_CURVE25519_SHA-256_ML-KEM-1024"
_F = b"\xff" * 32
_SALT = b"\x00" * 32


class Initiation(NamedTuple):
    """What :func:`initiate` returns: the secret, the associated data, the header to send."""

    shared_secret: bytes
    associated_data: bytes
    message: InitialMessage


def _kdf(dhs: list[bytes], kem_secret: bytes) -> bytes:
    return p.hkdf_sha256(_F + b"".join(dhs) + kem_secret, _SALT, PQXDH_INFO, 32)


def associated_data(initiator: PublicIdentity, responder: PublicIdentity) -> bytes:
    """``AD = Encode(IK_A) || Encode(IK_B)``: binds both identities to the session."""
    return initiator.encode() + responder.encode()


def initiate(
    alice: Identity, bundle: PrekeyBundle, *, ephemeral: bytes | None = None
) -> Initiation:
    """Alice's side: verify every signature in ``bundle``, then derive SK and AD.

    Raises :class:`~.errors.BadSignature` naming the key whose signature fails. The
    caller must also check ``bundle.identity`` against the key directory. ``ephemeral``
    (a raw X25519 private key) is for tests only; by default a fresh one is generated.
    """
    bundle.verify()
    ek = p.x25519_generate() if ephemeral is None else ephemeral
    ik = alice.private_bytes()[1]
    bob = bundle.identity
    spk = bundle.signed_prekey.public
    dhs = [p.x25519(ik, spk), p.x25519(ek, bob.dh_key), p.x25519(ek, spk)]
    opk = bundle.one_time_prekey
    if opk is not None:
        dhs.append(p.x25519(ek, opk.public))
    kem_secret, ciphertext = p.mlkem_encapsulate(bundle.pq_prekey.public)
    mine = PublicIdentity(alice.public_key, alice.dh_public_key, alice.dh_signature())
    message = InitialMessage(
        identity=mine,
        ephemeral_key=p.x25519_public(ek),
        kem_ciphertext=ciphertext,
        signed_prekey_id=bundle.signed_prekey.key_id,
        pq_prekey_id=bundle.pq_prekey.key_id,
        one_time_prekey_id=None if opk is None else opk.key_id,
    )
    return Initiation(_kdf(dhs, kem_secret), associated_data(mine, bob), message)


def respond(bob: DevicePrekeys, message: InitialMessage) -> tuple[bytes, bytes]:
    """Bob's side: ``(SK, AD)`` for ``message``; does not consume any prekey.

    Verifies that Alice's signing key vouches for her X25519 identity key (raises
    :class:`~.errors.BadSignature`) and raises :class:`~.errors.UnknownPrekey` for a
    prekey id Bob does not hold. The caller checks Alice's identity against the
    directory, then calls :meth:`DevicePrekeys.consume` once the first message decrypts.
    """
    message.identity.verify()
    spk = bob.signed_private(message.signed_prekey_id)
    pq_seed = bob.pq_private(message.pq_prekey_id)
    ik = bob.identity.private_bytes()[1]
    ek = message.ephemeral_key
    dhs = [p.x25519(spk, message.identity.dh_key), p.x25519(ik, ek), p.x25519(spk, ek)]
    if message.one_time_prekey_id is not None:
        dhs.append(p.x25519(bob.one_time_private(message.one_time_prekey_id), ek))
    kem_secret = p.mlkem_decapsulate(pq_seed, message.kem_ciphertext)
    return _kdf(dhs, kem_secret), associated_data(message.identity, bob.public_identity)
