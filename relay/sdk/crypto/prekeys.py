"""A device's private prekeys: what it generates, publishes and consumes.

Keys per device: the Ed25519 + X25519 identity (:class:`relay.sdk.keys.Identity`), a
signed X25519 prekey, a signed ML-KEM-1024 last-resort prekey, a pool of one-time X25519
prekeys and a pool of signed one-time ML-KEM-1024 prekeys. Private keys are raw bytes
(X25519 scalars, ML-KEM seeds); they leave this module only for the device state file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay import authproof
from relay.authproof import pq_prekey_transcript
from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.bundle import (
    OneTimePrekey,
    PqPrekey,
    PrekeyBundle,
    PublicIdentity,
    SignedPrekey,
)
from relay.sdk.crypto.errors import UnknownPrekey
from relay.sdk.keys import Identity

#: Default size of each one-time pool a new device uploads.
DEFAULT_POOL_SIZE = 100


@dataclass(slots=True)
class DevicePrekeys:
    """The private half of everything a device publishes for PQXDH."""

    identity: Identity = field(repr=False)
    signed: dict[int, bytes] = field(default_factory=dict, repr=False)
    last_resort: dict[int, bytes] = field(default_factory=dict, repr=False)
    one_time_ec: dict[int, bytes] = field(default_factory=dict, repr=False)
    one_time_pq: dict[int, bytes] = field(default_factory=dict, repr=False)
    next_id: int = 1

    @classmethod
    def generate(
        cls, identity: Identity, one_time_ec: int = DEFAULT_POOL_SIZE, one_time_pq: int = 0
    ) -> DevicePrekeys:
        """A signed prekey, a last-resort PQ prekey and the two one-time pools."""
        keys = cls(identity)
        keys.signed[keys._take_id()] = p.x25519_generate()
        keys.last_resort[keys._take_id()] = p.mlkem_generate()
        keys.add_one_time(one_time_ec, one_time_pq)
        return keys

    def _take_id(self) -> int:
        key_id = self.next_id
        self.next_id += 1
        return key_id

    def add_one_time(self, ec: int, pq: int) -> None:
        """Refill the pools with ``ec`` X25519 and ``pq`` ML-KEM-1024 one-time prekeys."""
        for _ in range(ec):
            self.one_time_ec[self._take_id()] = p.x25519_generate()
        for _ in range(pq):
            self.one_time_pq[self._take_id()] = p.mlkem_generate()

    @property
    def public_identity(self) -> PublicIdentity:
        """The identity as published."""
        return PublicIdentity(
            self.identity.public_key, self.identity.dh_public_key, self.identity.dh_signature()
        )

    def signed_prekey(self, key_id: int) -> SignedPrekey:
        """The published form of signed prekey ``key_id``."""
        public = p.x25519_public(self.signed_private(key_id))
        signature = self.identity.sign(authproof.signed_prekey_transcript(public))
        return SignedPrekey(key_id, public, signature)

    def pq_prekey(self, key_id: int) -> PqPrekey:
        """The published form of PQ prekey ``key_id`` (one-time or last-resort)."""
        public = p.mlkem_public(self.pq_private(key_id))
        signature = self.identity.sign(pq_prekey_transcript(public))
        return PqPrekey(key_id, public, signature, key_id in self.last_resort)

    def bundle(self) -> PrekeyBundle:
        """A bundle as the directory would serve it: lowest unused one-time keys first."""
        ec = min(self.one_time_ec, default=None)
        pq_id = min(self.one_time_pq, default=None)
        if pq_id is None:
            pq_id = max(self.last_resort)
        return PrekeyBundle(
            self.public_identity,
            self.signed_prekey(max(self.signed)),
            self.pq_prekey(pq_id),
            None if ec is None else OneTimePrekey(ec, p.x25519_public(self.one_time_ec[ec])),
        )

    def signed_private(self, key_id: int) -> bytes:
        """The private signed prekey ``key_id``."""
        if key_id not in self.signed:
            raise UnknownPrekey(f"no signed prekey {key_id}")
        return self.signed[key_id]

    def pq_private(self, key_id: int) -> bytes:
        """The ML-KEM seed of PQ prekey ``key_id``, one-time or last-resort."""
        seed = self.one_time_pq.get(key_id, self.last_resort.get(key_id))
        if seed is None:
            raise UnknownPrekey(f"no PQ prekey {key_id} (unknown or already used)")
        return seed

    def one_time_private(self, key_id: int) -> bytes:
        """The private one-time X25519 prekey ``key_id``."""
        if key_id not in self.one_time_ec:
            raise UnknownPrekey(f"no one-time prekey {key_id} (unknown or already used)")
        return self.one_time_ec[key_id]

    def consume(self, pq_prekey_id: int, one_time_prekey_id: int | None) -> None:
        """Delete the one-time keys an initial message used (last-resort keys stay).

        Call once the first ratchet message of the session has decrypted, so that a
        forged initial message cannot burn a one-time key.
        """
        self.one_time_pq.pop(pq_prekey_id, None)
        if one_time_prekey_id is not None:
            self.one_time_ec.pop(one_time_prekey_id, None)
