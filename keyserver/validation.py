"""Shape checks on keys, signatures and prekeys. Each error names the field at fault."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import mlkem

from keyserver.model import OneTimePrekey, PqPrekey, SignedPrekey
from relay import authproof
from relay.errors import InvalidArgument, LimitExceeded

KEY_BYTES = 32
#: An ML-KEM-1024 encapsulation key.
PQ_KEY_BYTES = 1568
SIGNATURE_BYTES = 64
MAX_KEY_ID = 2**32 - 1

# The table of small-order encodings lives in relay.authproof, whose verify() refuses them.
_SMALL_ORDER = authproof.SMALL_ORDER_KEYS


def is_small_order(key: bytes) -> bool:
    """Return whether ``key`` encodes an Ed25519 point of small order (a forgeable key)."""
    return authproof.is_small_order(key)


def check_length(field: str, value: bytes, size: int) -> None:
    """Raise InvalidArgument naming ``field`` unless ``value`` is exactly ``size`` bytes."""
    if len(value) != size:
        raise InvalidArgument(f"{field} must be {size} bytes, got {len(value)}")


def check_identity_key(field: str, key: bytes) -> None:
    """Raise InvalidArgument unless ``key`` can be an Ed25519 identity key."""
    check_length(field, key, KEY_BYTES)
    if is_small_order(key):
        raise InvalidArgument(f"{field} is a small-order point, not a usable Ed25519 key")


def check_key_id(field: str, key_id: int) -> None:
    """Raise InvalidArgument unless ``key_id`` fits in 32 bits."""
    if not 0 <= key_id <= MAX_KEY_ID:
        raise InvalidArgument(f"{field}.key_id {key_id} is out of range 0..{MAX_KEY_ID}")


def check_signed_prekey(field: str, prekey: SignedPrekey, identity_key: bytes) -> None:
    """Raise InvalidArgument unless ``prekey`` is well-formed and signed by ``identity_key``."""
    check_key_id(field, prekey.key_id)
    check_length(f"{field}.public_key", prekey.public_key, KEY_BYTES)
    check_length(f"{field}.signature", prekey.signature, SIGNATURE_BYTES)
    transcript = authproof.signed_prekey_transcript(prekey.public_key)
    if not authproof.verify(identity_key, prekey.signature, transcript):
        raise InvalidArgument(f"{field}.signature does not verify with identity_key")


def check_pq_prekey(field: str, prekey: PqPrekey, identity_key: bytes) -> None:
    """Raise InvalidArgument unless ``prekey`` is a valid ML-KEM-1024 key, signed.

    The signature must verify with ``identity_key``; the message names ``field`` and the
    key_id, e.g. ``one_time_pq_prekeys[3] (key_id 17): signature does not verify ...``.
    """
    check_key_id(field, prekey.key_id)
    named = f"{field} (key_id {prekey.key_id})"
    if len(prekey.public_key) != PQ_KEY_BYTES:
        raise InvalidArgument(
            f"{named}: public_key must be {PQ_KEY_BYTES} bytes, got {len(prekey.public_key)}"
        )
    if len(prekey.signature) != SIGNATURE_BYTES:
        raise InvalidArgument(
            f"{named}: signature must be {SIGNATURE_BYTES} bytes, got {len(prekey.signature)}"
        )
    transcript = authproof.pq_prekey_transcript(prekey.public_key)
    if not authproof.verify(identity_key, prekey.signature, transcript):
        raise InvalidArgument(f"{named}: signature does not verify with identity_key")
    try:
        mlkem.MLKEM1024PublicKey.from_public_bytes(prekey.public_key)
    except ValueError as exc:
        # Signed by the device, but no sender could encapsulate to it (FIPS 203 check).
        raise InvalidArgument(f"{named}: public_key is not a valid ML-KEM-1024 key") from exc


def check_one_time_pq_prekeys(
    field: str, prekeys: Sequence[PqPrekey], identity_key: bytes, max_per_request: int
) -> None:
    """Raise unless ``prekeys`` are at most ``max_per_request`` distinct, signed PQ keys."""
    _check_count(field, len(prekeys), "max_one_time_pq_prekeys_per_request", max_per_request)
    seen: set[int] = set()
    for i, prekey in enumerate(prekeys):
        check_pq_prekey(f"{field}[{i}]", prekey, identity_key)
        if prekey.key_id in seen:
            raise InvalidArgument(f"{field}[{i}].key_id {prekey.key_id} repeats an earlier key_id")
        seen.add(prekey.key_id)


def _check_count(field: str, count: int, limit: str, max_per_request: int) -> None:
    if count > max_per_request:
        raise LimitExceeded(
            limit,
            max_per_request,
            f"{field} has {count} keys, more than {limit} = {max_per_request}",
        )


def check_one_time_prekeys(
    field: str, prekeys: Sequence[OneTimePrekey], max_per_request: int
) -> None:
    """Raise unless ``prekeys`` are at most ``max_per_request`` well-formed, distinct keys."""
    _check_count(field, len(prekeys), "max_one_time_prekeys_per_request", max_per_request)
    seen: set[int] = set()
    for i, prekey in enumerate(prekeys):
        check_key_id(f"{field}[{i}]", prekey.key_id)
        check_length(f"{field}[{i}].public_key", prekey.public_key, KEY_BYTES)
        if prekey.key_id in seen:
            raise InvalidArgument(f"{field}[{i}].key_id {prekey.key_id} repeats an earlier key_id")
        seen.add(prekey.key_id)


def check_new_identity(
    identity_key: bytes, dh_key: bytes, dh_signature: bytes, proof: bytes
) -> None:
    """Check a new device's identity keys and the identity key's vouching for ``dh_key``.

    ``proof`` is only checked for size here: what it signs depends on the request.
    """
    check_identity_key("identity_key", identity_key)
    check_length("identity_dh_key", dh_key, KEY_BYTES)
    check_length("identity_dh_signature", dh_signature, SIGNATURE_BYTES)
    check_length("proof", proof, SIGNATURE_BYTES)
    if not authproof.verify(identity_key, dh_signature, authproof.identity_dh_transcript(dh_key)):
        raise InvalidArgument("identity_dh_signature does not verify with identity_key")
