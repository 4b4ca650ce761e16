"""Simulated devices: real Ed25519 keys, registration with proofs, the Connect handshake.

Registration follows ``RegisterDevice`` exactly as a real SDK does (identity key, X25519
identity key signed by it, signed prekey, last-resort ML-KEM-1024 prekey, proof of
possession), many at once over one channel with a bounded number in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay import authproof
from relay.accounts import ListedDevice, build_list
from relay.common.convert import address_to_pb, device_list_to_pb
from relay.model import Address
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc
from relaypb.relay.v1 import relay_pb2

CONNECT_METHOD = "/relaypb.relay.v1.Relay/Connect"
REGISTER_TIMEOUT_S = 60.0
HANDSHAKE_TIMEOUT_S = 60.0


class HandshakeError(RuntimeError):
    """The server did not answer the Connect handshake as the protocol says.

    ``status``: the code the call ended with, when it ended (None: a wrong frame).
    """

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status


def _raw(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class Identity:
    """A device's signing key and, once registered, its address."""

    index: int
    tenant: str
    user: str
    key: Ed25519PrivateKey
    device: int = 0

    @property
    def address(self) -> Address:
        """The device's address (after registration)."""
        return Address(self.tenant, self.user, self.device)


def registration_request(tenant: str, user: str, key: Ed25519PrivateKey) -> Any:
    """A RegisterDeviceRequest with fresh X25519 keys and every signature and proof."""
    dh, spk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ik, dhk, spk_pub = _raw(key), _raw(dh), _raw(spk)
    account = Ed25519PrivateKey.generate()
    first = build_list(
        tenant,
        user,
        1,
        int(time.time() * 1000),
        [ListedDevice.of(1, ik)],
        account_key=_raw(account),
    )
    # Required by RegisterDevice since PQXDH (issue 4): a signed last-resort ML-KEM key.
    pq_pub = mlkem.MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
    return keys_pb2.RegisterDeviceRequest(
        tenant=tenant,
        user=user,
        identity_key=ik,
        identity_dh_key=dhk,
        identity_dh_signature=key.sign(authproof.identity_dh_transcript(dhk)),
        signed_prekey=keys_pb2.SignedPrekey(
            key_id=1,
            public_key=spk_pub,
            signature=key.sign(authproof.signed_prekey_transcript(spk_pub)),
        ),
        proof=key.sign(authproof.registration_transcript(tenant, user, ik, dhk)),
        last_resort_pq_prekey=keys_pb2.PqPrekey(
            key_id=2, public_key=pq_pub, signature=key.sign(authproof.pq_prekey_transcript(pq_pub))
        ),
        # Required since accounts (issue 9): each load user is a new account of one device.
        account_key=_raw(account),
        device_list=device_list_to_pb(
            dataclasses.replace(first, signature=account.sign(first.transcript()))
        ),
    )


async def register_all(
    channel: grpc.aio.Channel,
    tenant: str,
    users: Sequence[tuple[int, str]],
    concurrency: int,
) -> list[Identity]:
    """Register one new device for each ``(index, user)``; at most ``concurrency`` at once."""
    stub = keys_pb2_grpc.KeyDirectoryStub(channel)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, user: str) -> Identity:
        key = Ed25519PrivateKey.generate()
        request = registration_request(tenant, user, key)
        async with gate:
            reply = await stub.RegisterDevice(request, timeout=REGISTER_TIMEOUT_S)
        return Identity(index, tenant, user, key, reply.address.device)

    return list(await asyncio.gather(*(one(i, u) for i, u in users)))


def open_call(channel: grpc.aio.Channel) -> Any:
    """A Connect call that takes pre-serialized ClientFrame bytes."""
    connect: Any = channel.stream_stream(
        CONNECT_METHOD,
        request_serializer=None,
        response_deserializer=relay_pb2.ServerFrame.FromString,
    )
    return connect()


async def handshake(call: Any, identity: Identity, *, receive: bool) -> relay_pb2.Ready:
    """Hello -> Challenge -> AuthResponse -> Ready on ``call``; returns the Ready frame.

    Raises HandshakeError with the call's status if the server ends the call instead.
    """
    try:
        return await _handshake(call, identity, receive=receive)
    except asyncio.InvalidStateError:
        code, details = await call.code(), await call.details()
        raise HandshakeError(
            f"{identity.address}: Connect ended during the handshake: {code.name} {details}",
            code,
        ) from None


async def _handshake(call: Any, identity: Identity, *, receive: bool) -> relay_pb2.Ready:
    hello = relay_pb2.ClientFrame(
        hello=relay_pb2.Hello(
            address=address_to_pb(identity.address), receive=receive, client_version="loadtest"
        )
    )
    await call.write(hello.SerializeToString())
    first = await call.read()
    if first is grpc.aio.EOF or first.WhichOneof("frame") != "challenge":
        code = await call.code()
        raise HandshakeError(
            f"{identity.address}: expected a challenge, got {first!r} "
            f"({code.name} {await call.details()})",
            code if first is grpc.aio.EOF else None,
        )
    ch = first.challenge
    transcript = authproof.connect_transcript(
        ch.nonce, ch.node_id, ch.server_time_ms, identity.address
    )
    auth = relay_pb2.ClientFrame(
        auth=relay_pb2.AuthResponse(signature=identity.key.sign(transcript))
    )
    await call.write(auth.SerializeToString())
    second = await call.read()
    if second is grpc.aio.EOF or second.WhichOneof("frame") != "ready":
        code = await call.code()
        raise HandshakeError(
            f"{identity.address}: expected ready, got {second!r} "
            f"({code.name} {await call.details()})",
            code if second is grpc.aio.EOF else None,
        )
    ready: relay_pb2.Ready = second.ready
    return ready
