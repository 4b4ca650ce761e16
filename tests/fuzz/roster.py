"""The devices registered on the servers under fuzz, with real keys and proofs.

Registration is written out here rather than borrowed from ``tests.support`` while
RegisterDevice gains account fields: the first device of a user creates the account
key and a device list of itself, signed by that key (``relay.accounts``). When
RegisterDevice changes again, ``registration`` is the one function to adapt.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relay import accounts, authproof
from relay.clock import Clock
from relay.common.convert import address_from_pb, device_list_to_pb
from relay.model import Address
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc


@dataclass(frozen=True)
class Member:
    """A registered device: its address, identity key, and its user's account key."""

    address: Address
    signing_key: Ed25519PrivateKey
    account_key: Ed25519PrivateKey

    @property
    def identity_key(self) -> bytes:
        """The Ed25519 public identity key."""
        return self.signing_key.public_key().public_bytes_raw()


def registration(
    tenant: str,
    user: str,
    signing_key: Ed25519PrivateKey,
    account_key: Ed25519PrivateKey,
    timestamp_ms: int,
) -> keys_pb2.RegisterDeviceRequest:
    """A RegisterDeviceRequest creating ``user`` with this device as device 1."""
    ik = signing_key.public_key().public_bytes_raw()
    dhk = X25519PrivateKey.generate().public_key().public_bytes_raw()
    spk = X25519PrivateKey.generate().public_key().public_bytes_raw()
    pq = mlkem.MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
    account = account_key.public_key().public_bytes_raw()
    listed = accounts.build_list(
        tenant, user, 1, timestamp_ms, [accounts.ListedDevice.of(1, ik)], account_key=account
    )
    signed = accounts.DeviceList(
        listed.tenant,
        listed.user,
        listed.version,
        listed.timestamp_ms,
        listed.devices,
        listed.account_key,
        account_key.sign(listed.transcript()),
    )
    return keys_pb2.RegisterDeviceRequest(
        tenant=tenant,
        user=user,
        identity_key=ik,
        identity_dh_key=dhk,
        identity_dh_signature=signing_key.sign(authproof.identity_dh_transcript(dhk)),
        signed_prekey=keys_pb2.SignedPrekey(
            key_id=1,
            public_key=spk,
            signature=signing_key.sign(authproof.signed_prekey_transcript(spk)),
        ),
        proof=signing_key.sign(authproof.registration_transcript(tenant, user, ik, dhk)),
        last_resort_pq_prekey=keys_pb2.PqPrekey(
            key_id=2, public_key=pq, signature=signing_key.sign(authproof.pq_prekey_transcript(pq))
        ),
        account_key=account,
        device_list=device_list_to_pb(signed),
    )


async def enroll(channel: grpc.aio.Channel, tenant: str, user: str, clock: Clock) -> Member:
    """Create ``tenant``/``user`` with its first device on the key directory of ``channel``."""
    signing_key, account_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    request = registration(tenant, user, signing_key, account_key, clock.now_ms())
    reply = await keys_pb2_grpc.KeyDirectoryStub(channel).RegisterDevice(request)
    return Member(address_from_pb(reply.address), signing_key, account_key)
