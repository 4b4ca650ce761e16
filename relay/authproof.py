"""Byte transcripts that devices sign with their Ed25519 identity key.

Shared by the servers (which verify) and the SDK (which signs), so both sides build
exactly the same bytes. Every transcript starts with a distinct label so a signature
made for one purpose can never be replayed for another.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay.model import Address

CONNECT_LABEL = b"e2ee-relay/connect/v1"
REGISTER_LABEL = b"e2ee-relay/register/v1"
REQUEST_LABEL = b"e2ee-relay/request/v1"
SIGNED_PREKEY_LABEL = b"e2ee-relay/signed-prekey/v1"
IDENTITY_DH_LABEL = b"e2ee-relay/identity-dh/v1"
PQ_PREKEY_LABEL = b"e2ee-relay/pq-prekey/v1"
DEVICE_LIST_LABEL = b"e2ee-relay/device-list/v1"
LINK_REQUEST_LABEL = b"e2ee-relay/link-request/v1"
#: ``Encode_KEM`` type byte of an ML-KEM-1024 public key (PQXDH section 2.5; the value
#: ``relay.sdk.crypto.primitives.KEM_TYPE_MLKEM1024``, pinned equal by a test).
KEM_TYPE_MLKEM1024 = 0x0A

#: Metadata keys of a device-signed unary request.
REQUEST_DEVICE_HEADER = "x-relay-device"
REQUEST_TIME_HEADER = "x-relay-time-ms"
REQUEST_SIGNATURE_HEADER = "x-relay-signature-bin"
REQUEST_NONCE_HEADER = "x-relay-nonce-bin"
#: Bytes of a request nonce.
REQUEST_NONCE_BYTES = 16


def _field(data: bytes) -> bytes:
    """Length-prefix one field so that concatenations are unambiguous."""
    return struct.pack(">I", len(data)) + data


def _address(address: Address) -> bytes:
    return (
        _field(address.tenant.encode())
        + _field(address.user.encode())
        + struct.pack(">I", address.device)
    )


def connect_transcript(nonce: bytes, node_id: str, server_time_ms: int, address: Address) -> bytes:
    """Bytes a device signs to answer a Connect challenge."""
    return (
        _field(CONNECT_LABEL)
        + _field(nonce)
        + _field(node_id.encode())
        + struct.pack(">q", server_time_ms)
        + _address(address)
    )


def registration_transcript(
    tenant: str, user: str, identity_key: bytes, identity_dh_key: bytes
) -> bytes:
    """Bytes a new device signs to prove it holds the identity key it registers."""
    return (
        _field(REGISTER_LABEL)
        + _field(tenant.encode())
        + _field(user.encode())
        + _field(identity_key)
        + _field(identity_dh_key)
    )


def device_list_transcript(
    tenant: str,
    user: str,
    version: int,
    timestamp_ms: int,
    devices: Sequence[tuple[int, bytes, int]],
    *,
    account_key: bytes,
) -> bytes:
    """Bytes the account key signs for a user's device list.

    ``devices`` are ``(number, identity_key, registration_id)`` in the order listed.
    """
    out = (
        _field(DEVICE_LIST_LABEL)
        + _field(tenant.encode())
        + _field(user.encode())
        + struct.pack(">Qq", version, timestamp_ms)
        + _field(account_key)
        + struct.pack(">I", len(devices))
    )
    for number, identity_key, reg_id in devices:
        out += struct.pack(">I", number) + _field(identity_key) + struct.pack(">I", reg_id)
    return out


def link_request_transcript(
    tenant: str, user: str, identity_key: bytes, identity_dh_key: bytes, link_key: bytes
) -> bytes:
    """Bytes a new device signs to ask to join ``user`` (proves it holds the identity key)."""
    return (
        _field(LINK_REQUEST_LABEL)
        + _field(tenant.encode())
        + _field(user.encode())
        + _field(identity_key)
        + _field(identity_dh_key)
        + _field(link_key)
    )


def signed_prekey_transcript(public_key: bytes) -> bytes:
    """Bytes the identity key signs to vouch for a signed prekey."""
    return _field(SIGNED_PREKEY_LABEL) + _field(public_key)


def identity_dh_transcript(identity_dh_key: bytes) -> bytes:
    """Bytes the identity key signs to vouch for the device's X25519 identity key."""
    return _field(IDENTITY_DH_LABEL) + _field(identity_dh_key)


def pq_prekey_transcript(public_key: bytes) -> bytes:
    """Bytes the identity key signs to vouch for an ML-KEM-1024 prekey (one-time or last-resort).

    ``field(PQ_PREKEY_LABEL) || field(Encode_KEM(public_key))`` with ``Encode_KEM`` the
    type byte 0x0A followed by the 1568-byte key. The length is not checked here: a key
    of another length simply gets a transcript no honest device signs.
    """
    return _field(PQ_PREKEY_LABEL) + _field(bytes([KEM_TYPE_MLKEM1024]) + public_key)


def request_transcript(
    method: str, address: Address, time_ms: int, body: bytes, nonce: bytes = b""
) -> bytes:
    """Bytes a device signs for a unary request (``body`` = deterministic serialization).

    ``nonce`` (random, sent in REQUEST_NONCE_HEADER) makes two identical requests signed
    in the same millisecond distinct, so neither is taken for a replay of the other.
    """
    out = (
        _field(REQUEST_LABEL)
        + _field(method.encode())
        + _address(address)
        + struct.pack(">q", time_ms)
        + _field(hashlib.sha256(body).digest())
    )
    return out + _field(nonce) if nonce else out


# Encodings (sign bit cleared) of the Ed25519 points of order 1, 2, 4 and 8, canonical
# and not: y = 0, 1, two order-8 values, p - 1, p and p + 1 (the list libsodium rejects).
# A public key among them verifies signatures nobody had to make with a private key.
SMALL_ORDER_KEYS = frozenset(
    bytes.fromhex(h)
    for h in (
        "00" * 32,
        "01" + "00" * 31,
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ec" + "ff" * 30 + "7f",
        "ed" + "ff" * 30 + "7f",
        "ee" + "ff" * 30 + "7f",
    )
)


def is_small_order(key: bytes) -> bool:
    """Return whether ``key`` encodes an Ed25519 point of small order (a forgeable key)."""
    return len(key) == 32 and key[:31] + bytes([key[31] & 0x7F]) in SMALL_ORDER_KEYS


def verify(public_key: bytes, signature: bytes, transcript: bytes) -> bool:
    """Return whether ``signature`` is a valid Ed25519 signature of ``transcript``.

    Small-order public keys are refused: with them a signature verifies that nobody
    made with a private key.
    """
    if len(public_key) != 32 or len(signature) != 64 or is_small_order(public_key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, transcript)
    except (InvalidSignature, ValueError):
        return False
    return True


def format_address(address: Address) -> str:
    """``tenant/user/device`` (the form used in logs and error messages)."""
    return str(address)


def parse_address(text: str) -> Address:
    """Parse ``tenant/user/device`` (inverse of :func:`format_address`)."""
    parts = text.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"address {text!r} is not of the form tenant/user/device")
    return Address(parts[0], parts[1], int(parts[2]))
