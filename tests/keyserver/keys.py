"""Real device keys for tests: registrations and prekeys that verify."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyserver.model import OneTimePrekey, Registration, SignedPrekey
from relay import authproof
from relaypb.keys.v1 import keys_pb2

RAW = (Encoding.Raw, PublicFormat.Raw)


def public(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(*RAW))


def x25519() -> bytes:
    return public(X25519PrivateKey.generate())


@dataclass
class DeviceKeys:
    """A device's identity keys, able to sign what the key directory checks."""

    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    identity_dh_key: bytes = field(default_factory=x25519)

    @property
    def identity_key(self) -> bytes:
        return public(self.signing)

    def sign(self, data: bytes) -> bytes:
        return self.signing.sign(data)

    def signed_prekey(self, key_id: int = 1) -> SignedPrekey:
        pk = x25519()
        return SignedPrekey(key_id, pk, self.sign(authproof.signed_prekey_transcript(pk)))

    def registration(
        self, tenant: str = "acme", user: str = "alice", one_time: Iterable[int] = (), **kw: Any
    ) -> Registration:
        ik, dhk = self.identity_key, self.identity_dh_key
        reg = Registration(
            tenant=tenant,
            user=user,
            identity_key=ik,
            identity_dh_key=dhk,
            identity_dh_signature=self.sign(authproof.identity_dh_transcript(dhk)),
            signed_prekey=self.signed_prekey(),
            one_time_prekeys=one_time_prekeys(one_time),
            proof=self.sign(authproof.registration_transcript(tenant, user, ik, dhk)),
        )
        return replace(reg, **kw)


def one_time_prekeys(key_ids: Iterable[int]) -> tuple[OneTimePrekey, ...]:
    return tuple(OneTimePrekey(i, x25519()) for i in key_ids)


def signed_prekey_pb(spk: SignedPrekey) -> keys_pb2.SignedPrekey:
    return keys_pb2.SignedPrekey(
        key_id=spk.key_id, public_key=spk.public_key, signature=spk.signature
    )


def one_time_pb(prekeys: Iterable[OneTimePrekey]) -> list[keys_pb2.OneTimePrekey]:
    return [keys_pb2.OneTimePrekey(key_id=p.key_id, public_key=p.public_key) for p in prekeys]


def registration_pb(reg: Registration) -> keys_pb2.RegisterDeviceRequest:
    request = keys_pb2.RegisterDeviceRequest(
        tenant=reg.tenant,
        user=reg.user,
        identity_key=reg.identity_key,
        identity_dh_key=reg.identity_dh_key,
        identity_dh_signature=reg.identity_dh_signature,
        one_time_prekeys=one_time_pb(reg.one_time_prekeys),
        proof=reg.proof,
    )
    if reg.signed_prekey is not None:
        request.signed_prekey.CopyFrom(signed_prekey_pb(reg.signed_prekey))
    return request
