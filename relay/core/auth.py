"""Authentication: device challenges on Connect, tenant API keys on Send."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from relay import authproof
from relay.clock import Clock
from relay.core.ports import IdentityKeys
from relay.errors import Unauthenticated
from relay.model import Address

NONCE_BYTES = 32


@dataclass(frozen=True, slots=True)
class Challenge:
    """A single-use challenge for one Connect stream."""

    address: Address
    nonce: bytes
    node_id: str
    server_time_ms: int

    def transcript(self) -> bytes:
        """The bytes the device must sign."""
        return authproof.connect_transcript(
            self.nonce, self.node_id, self.server_time_ms, self.address
        )


class DeviceAuthenticator:
    """Issues Connect challenges and checks their answers against the key directory.

    A challenge lives in one stream only and is answered once, so a signature cannot be
    replayed on another stream; it expires ``timeout_ms`` after it was issued.
    """

    def __init__(
        self, identities: IdentityKeys, clock: Clock, node_id: str, timeout_ms: int
    ) -> None:
        self._identities = identities
        self._clock = clock
        self._node_id = node_id
        self._timeout_ms = timeout_ms

    def challenge(self, address: Address) -> Challenge:
        """A fresh challenge for ``address``."""
        return Challenge(
            address, secrets.token_bytes(NONCE_BYTES), self._node_id, self._clock.now_ms()
        )

    async def verify(self, challenge: Challenge, signature: bytes) -> None:
        """Return if ``signature`` answers ``challenge`` in time, else raise Unauthenticated."""
        age = self._clock.now_ms() - challenge.server_time_ms
        if age > self._timeout_ms:
            raise Unauthenticated(
                f"challenge answered after {age} ms; it expires after {self._timeout_ms} ms "
                "(limits.auth_timeout_seconds): reconnect and answer promptly"
            )
        key = await self._identities.identity_key(challenge.address)
        if key is None:
            raise Unauthenticated(
                f"device {challenge.address} is not registered with the key directory"
            )
        if not authproof.verify(key, signature, challenge.transcript()):
            raise Unauthenticated(
                f"challenge signature does not verify with the identity key registered "
                f"for {challenge.address}"
            )


@dataclass(frozen=True, slots=True)
class ServiceSender:
    """A server-side sender authenticated by a tenant API key."""

    tenant: str
    name: str

    @property
    def address(self) -> Address:
        """The sender address its envelopes carry: device 0 of user ``service:<name>``."""
        return Address(self.tenant, f"service:{self.name}", 0)


class ApiKeys:
    """Tenant API keys, held as SHA-256 digests only."""

    def __init__(self, digests: Mapping[bytes, ServiceSender]) -> None:
        self._digests = dict(digests)

    def authenticate(self, key: str | None) -> ServiceSender:
        """The sender owning ``key``, or raise Unauthenticated."""
        if not self._digests:
            raise Unauthenticated(
                "this relay has no API keys configured ([[api_keys]] in the config file)"
            )
        if not key:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode()).digest()
        for known, sender in self._digests.items():
            if hmac.compare_digest(known, digest):
                return sender
        raise Unauthenticated("API key not recognised")
