"""Registration tokens: how a tenant's backend vouches for who may claim a user name.

A tenant whose registration policy is ``token`` holds an Ed25519 *tenant signing key*;
the key directory knows its public half (``[[keyserver.tenants]]``). The tenant's
backend, having checked the person in its own way, mints a short-lived token for
exactly one (tenant, user) and purpose, and the new device presents it
(``relayctl init --token T``). The key directory accepts each token once, before it
expires.

Wire form: ``rt1.`` + base64url (no padding) of::

    field(label) || field(tenant) || field(user) || field(purpose)
      || int64 expires_at_ms || field(token_id: 16 random bytes) || signature (64 bytes)

where ``field`` is a 4-byte big-endian length and the bytes, and the signature is over
everything before it. Mint with :func:`mint` (or ``relayd mint-token``).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import authproof
from relay.errors import InvalidArgument

TOKEN_LABEL = b"e2ee-relay/registration-token/v1"
PREFIX = "rt1."
PURPOSES = ("register", "reset")
#: Tokens may live at most this long (a longer-lived token is refused as minted wrong).
MAX_TOKEN_LIFETIME_MS = 24 * 3600 * 1000
DEFAULT_TOKEN_TTL_SECONDS = 600
_MAX_TOKEN_CHARS = 2048


@dataclass(frozen=True, slots=True)
class RegistrationToken:
    """A parsed token (its signature not yet checked)."""

    tenant: str
    user: str
    purpose: str
    expires_at_ms: int
    token_id: bytes
    signed: bytes
    signature: bytes

    def verifies(self, tenant_key: bytes) -> bool:
        """Whether the token is signed by the tenant signing key ``tenant_key``."""
        return authproof.verify(tenant_key, self.signature, self.signed)


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _payload(tenant: str, user: str, purpose: str, expires_at_ms: int, token_id: bytes) -> bytes:
    return (
        _field(TOKEN_LABEL)
        + _field(tenant.encode())
        + _field(user.encode())
        + _field(purpose.encode())
        + struct.pack(">q", expires_at_ms)
        + _field(token_id)
    )


def mint(
    tenant_key: Ed25519PrivateKey,
    tenant: str,
    user: str,
    *,
    now_ms: int,
    ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS,
    purpose: str = "register",
) -> str:
    """A token letting one device claim (or, with ``purpose="reset"``, reset) ``user``."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    if not 0 < ttl_seconds * 1000 <= MAX_TOKEN_LIFETIME_MS:
        raise ValueError(
            f"ttl_seconds {ttl_seconds} is out of range 1..{MAX_TOKEN_LIFETIME_MS // 1000} "
            "(tokens are short-lived)"
        )
    payload = _payload(tenant, user, purpose, now_ms + ttl_seconds * 1000, secrets.token_bytes(16))
    raw = payload + tenant_key.sign(payload)
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def field(self) -> bytes:
        (n,) = struct.unpack(">I", self.take(4))
        return self.take(n)


def parse(token: str) -> RegistrationToken:
    """Parse a token; InvalidArgument (naming what is wrong) if it is not one."""
    if len(token) > _MAX_TOKEN_CHARS or not token.startswith(PREFIX):
        raise InvalidArgument(
            f"registration_token is not a registration token (they start with {PREFIX!r}); "
            "ask the app's backend for a new one"
        )
    body = token[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        reader = _Reader(raw)
        if reader.field() != TOKEN_LABEL:
            raise ValueError("label")
        tenant = reader.field().decode()
        user = reader.field().decode()
        purpose = reader.field().decode()
        (expires,) = struct.unpack(">q", reader.take(8))
        token_id = reader.field()
        signed = raw[: reader.pos]
        signature = reader.take(64)
        if reader.pos != len(raw) or len(token_id) != 16:
            raise ValueError("length")
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            "registration_token is damaged (it does not parse); copy it again or ask for a new one"
        ) from exc
    return RegistrationToken(tenant, user, purpose, expires, token_id, signed, signature)


def write_tenant_key(prefix: Path) -> tuple[Path, Path]:
    """Make a tenant signing key: ``<prefix>.key`` (private, hex, 0600) and ``<prefix>.pub``.

    The private file belongs on the tenant's backend (it mints tokens); the public one
    is what the key directory's ``token_public_key_file`` names. Refuses to overwrite.
    """
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    key = Ed25519PrivateKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.private_bytes_raw().hex() + "\n")
    public_path.write_text(key.public_key().public_bytes_raw().hex() + "\n")
    return private_path, public_path


def read_tenant_key(path: Path) -> Ed25519PrivateKey:
    """The tenant signing key in ``path`` (64 hex digits, as ``write_tenant_key`` makes)."""
    text = path.read_text().strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not 64 hex digits") from exc
    if len(raw) != 32:
        raise ValueError(f"{path}: not 64 hex digits (an Ed25519 private key)")
    return Ed25519PrivateKey.from_private_bytes(raw)
