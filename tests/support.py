"""Test helpers that speak the wire protocol directly (independent of the SDK)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyserver.client import sign_request_metadata
from relay import authproof
from relay.accounts import ListedDevice, build_list
from relay.clock import SystemClock
from relay.common.convert import address_from_pb, address_to_pb, device_list_to_pb
from relay.common.tls import secure_or_plain_channel
from relay.model import Address
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc

RAW = (Encoding.Raw, PublicFormat.Raw)


def pub(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(*RAW))


@dataclass
class Device:
    address: Address
    signing_key: Ed25519PrivateKey


@dataclass
class _Account:
    """What the tests remember of a user they created: to link its next devices."""

    private: Ed25519PrivateKey
    list: keys_pb2.SignedDeviceList
    first: Device


#: Accounts made by ``register``, by (key directory, tenant, user).
_ACCOUNTS: dict[tuple[str, str, str], _Account] = {}


def _sign_list(
    private: Ed25519PrivateKey,
    tenant: str,
    user: str,
    version: int,
    devices: list[tuple[int, bytes]],
) -> keys_pb2.SignedDeviceList:
    listed = [ListedDevice.of(n, k) for n, k in sorted(devices)]
    unsigned = build_list(
        tenant, user, version, int(time.time() * 1000), listed, account_key=pub(private)
    )
    signed = dataclasses.replace(unsigned, signature=private.sign(unsigned.transcript()))
    return device_list_to_pb(signed)


def signed_metadata(
    method: str, device: Device, request: Any
) -> tuple[tuple[str, str | bytes], ...]:
    """Metadata signing ``request`` as ``device`` (real time)."""
    return sign_request_metadata(
        f"/relaypb.keys.v1.KeyDirectory/{method}",
        device.address,
        device.signing_key,
        request,
        SystemClock(),
    )


def channel_to(target: str, tls_ca: str = "") -> grpc.aio.Channel:
    """A channel to ``target``: TLS verified with ``tls_ca`` if given, else plaintext."""
    return secure_or_plain_channel(target, ca_file=tls_ca, tls=bool(tls_ca))


async def register(
    keys_target: str, user: str, tenant: str = "default", *, tls_ca: str = ""
) -> Device:
    """A new device of ``user`` with real keys and proofs.

    The first device of a user creates its account (a new account key, the first signed
    list); a further one is linked the way devices link: a link request, approved with
    the next signed list by the first device (signed requests in real time). With
    ``tls_ca`` the key directory is reached over TLS verified with that CA.
    """
    sk = Ed25519PrivateKey.generate()
    dh = X25519PrivateKey.generate()
    spk = X25519PrivateKey.generate()
    ik, dhk = pub(sk), pub(dh)
    pq = mlkem.MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
    signed_prekey = keys_pb2.SignedPrekey(
        key_id=1,
        public_key=pub(spk),
        signature=sk.sign(authproof.signed_prekey_transcript(pub(spk))),
    )
    last_resort = keys_pb2.PqPrekey(
        key_id=2, public_key=pq, signature=sk.sign(authproof.pq_prekey_transcript(pq))
    )
    async with channel_to(keys_target, tls_ca) as channel:
        stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        # Create the account unless the key directory says the user exists (a port of an
        # earlier test's server may be reused, so the helper's memory alone cannot say).
        private = Ed25519PrivateKey.generate()
        first_list = _sign_list(private, tenant, user, 1, [(1, ik)])
        request = keys_pb2.RegisterDeviceRequest(
            tenant=tenant,
            user=user,
            identity_key=ik,
            identity_dh_key=dhk,
            identity_dh_signature=sk.sign(authproof.identity_dh_transcript(dhk)),
            signed_prekey=signed_prekey,
            proof=sk.sign(authproof.registration_transcript(tenant, user, ik, dhk)),
            last_resort_pq_prekey=last_resort,
            account_key=pub(private),
            device_list=first_list,
        )
        try:
            reply = await stub.RegisterDevice(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        else:
            device = Device(address_from_pb(reply.address), sk)
            _ACCOUNTS[(keys_target, tenant, user)] = _Account(private, first_list, device)
            return device
        account = _ACCOUNTS[(keys_target, tenant, user)]
        link_key = pub(X25519PrivateKey.generate())
        asked = await stub.RequestLink(
            keys_pb2.RequestLinkRequest(
                tenant=tenant,
                user=user,
                identity_key=ik,
                identity_dh_key=dhk,
                identity_dh_signature=sk.sign(authproof.identity_dh_transcript(dhk)),
                signed_prekey=signed_prekey,
                last_resort_pq_prekey=last_resort,
                link_key=link_key,
                proof=sk.sign(authproof.link_request_transcript(tenant, user, ik, dhk, link_key)),
            )
        )
        listing = keys_pb2.ListLinkRequestsRequest()
        waiting = await stub.ListLinkRequests(
            listing, metadata=signed_metadata("ListLinkRequests", account.first, listing)
        )
        current = waiting.device_list
        devices = [(d.device, d.identity_key) for d in current.devices]
        new_list = _sign_list(
            account.private,
            tenant,
            user,
            current.version + 1,
            [*devices, (waiting.next_device, ik)],
        )
        approve = keys_pb2.ApproveLinkRequest(
            request_id=asked.request_id, device_list=new_list, sealed_account=os.urandom(96)
        )
        reply = await stub.ApproveLink(
            approve, metadata=signed_metadata("ApproveLink", account.first, approve)
        )
        account.list = new_list
        return Device(address_from_pb(reply.address), sk)


def envelope(recipient: Address, content: bytes, **kw: Any) -> relay_pb2.Envelope:
    return relay_pb2.Envelope(
        message_id=kw.pop("message_id", os.urandom(16)),
        recipient=address_to_pb(recipient),
        content=content,
        **kw,
    )


@dataclass
class RawSession:
    """One Connect stream driven frame by frame."""

    call: Any
    ready: relay_pb2.Ready
    frames: asyncio.Queue[relay_pb2.ServerFrame | BaseException] = field(
        default_factory=asyncio.Queue
    )
    results: dict[int, asyncio.Future[relay_pb2.SendResults]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _batch: int = 0

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                if frame.WhichOneof("frame") == "send_results":
                    fut = self.results.pop(frame.send_results.batch_id)
                    fut.set_result(frame.send_results)
                else:
                    await self.frames.put(frame)
            await self.frames.put(EOFError("stream ended"))
        except BaseException as exc:
            await self.frames.put(exc)

    async def send(self, *envs: relay_pb2.Envelope) -> list[relay_pb2.SendResult]:
        self._batch += 1
        fut: asyncio.Future[relay_pb2.SendResults] = asyncio.get_running_loop().create_future()
        self.results[self._batch] = fut
        await self.call.write(
            relay_pb2.ClientFrame(
                send=relay_pb2.SendBatch(batch_id=self._batch, envelopes=list(envs))
            )
        )
        return list((await asyncio.wait_for(fut, 30)).results)

    async def ack(self, *ids: bytes) -> None:
        await self.call.write(relay_pb2.ClientFrame(ack=relay_pb2.AckBatch(message_ids=list(ids))))

    async def frame(self, timeout: float = 30) -> relay_pb2.ServerFrame:
        item = await asyncio.wait_for(self.frames.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def receive(self, count: int, timeout: float = 30) -> list[relay_pb2.Envelope]:
        """Collect ``count`` envelopes, skipping a queue-empty marker."""
        out: list[relay_pb2.Envelope] = []
        while len(out) < count:
            f = await self.frame(timeout)
            if f.WhichOneof("frame") == "deliver":
                out.extend(f.deliver.envelopes)
        return out

    async def until_queue_empty(self, timeout: float = 30) -> list[relay_pb2.Envelope]:
        """Envelopes delivered before the queue-empty marker."""
        out: list[relay_pb2.Envelope] = []
        while True:
            f = await self.frame(timeout)
            kind = f.WhichOneof("frame")
            if kind == "queue_empty":
                return out
            assert kind == "deliver", kind
            out.extend(f.deliver.envelopes)

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def connect(channel: grpc.aio.Channel, device: Device, *, receive: bool = True) -> RawSession:
    """Open and authenticate a Connect stream."""
    call = relay_pb2_grpc.RelayStub(channel).Connect()
    await call.write(
        relay_pb2.ClientFrame(
            hello=relay_pb2.Hello(address=address_to_pb(device.address), receive=receive)
        )
    )
    first = await call.read()
    ch = first.challenge
    transcript = authproof.connect_transcript(
        ch.nonce, ch.node_id, ch.server_time_ms, device.address
    )
    await call.write(
        relay_pb2.ClientFrame(
            auth=relay_pb2.AuthResponse(signature=device.signing_key.sign(transcript))
        )
    )
    second = await call.read()
    if second is grpc.aio.EOF or second.WhichOneof("frame") != "ready":
        await call  # raises the status the server ended with
        raise AssertionError(f"expected ready, got {second}")
    session = RawSession(call, second.ready)
    session.start()
    return session


async def remove(keys_target: str, device: Address) -> None:
    """Remove ``device`` (made by ``register``) with a signed RemoveDevice request.

    The user's first device signs the request; the new list (the current one without
    ``device``, next version) is signed by the account key.
    """
    account = _ACCOUNTS[(keys_target, device.tenant, device.user)]
    current = account.list
    new_list = _sign_list(
        account.private,
        device.tenant,
        device.user,
        current.version + 1,
        [(d.device, d.identity_key) for d in current.devices if d.device != device.device],
    )
    request = keys_pb2.RemoveDeviceRequest(device=address_to_pb(device), device_list=new_list)
    async with grpc.aio.insecure_channel(keys_target) as channel:
        await keys_pb2_grpc.KeyDirectoryStub(channel).RemoveDevice(
            request, metadata=signed_metadata("RemoveDevice", account.first, request)
        )
    account.list = new_list
