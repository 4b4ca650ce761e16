"""Async client of the key directory (relaypb.keys.v1.KeyDirectory)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    sign_request_metadata,
)
from relay import authproof
from relay.clock import Clock, SystemClock
from relay.errors import Unauthenticated
from relay.model import Address
from relay.sdk.keys import Identity, Prekey
from relay.sdk.status import from_rpc_error
from relaypb.common.v1 import address_pb2
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 10.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A registered device of a user."""

    address: Address
    identity_key: bytes
    registered_at_ms: int


@dataclass(frozen=True, slots=True)
class PublicPrekey:
    """The public half of a prekey; ``signature`` is empty for a one-time prekey."""

    key_id: int
    public: bytes
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What a sender needs to start a session with one device (signatures verified)."""

    address: Address
    identity_key: bytes
    identity_dh_key: bytes
    identity_dh_signature: bytes
    signed_prekey: PublicPrekey
    one_time_prekey: PublicPrekey | None


def to_pb(address: Address) -> address_pb2.Address:
    """The protobuf form of ``address``."""
    return address_pb2.Address(tenant=address.tenant, user=address.user, device=address.device)


def from_pb(address: address_pb2.Address) -> Address:
    """The domain form of a protobuf address."""
    return Address(address.tenant, address.user, address.device)


class KeyDirectoryClient:
    """Register devices, publish and fetch prekeys, list devices.

    The caller owns ``channel``. Failures raise relay.errors exceptions (``Unavailable``
    when the directory cannot be reached, ``NotFound``, ``Unauthenticated``, ...).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        target: str = "",
        clock: Clock | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        self._target = target or "key directory"
        self._clock = clock or SystemClock()
        self._timeout = timeout

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, target=f"key directory {self._target}") from exc

    async def register(
        self,
        identity: Identity,
        tenant: str,
        user: str,
        signed_prekey: Prekey,
        one_time_prekeys: Sequence[Prekey] = (),
    ) -> Address:
        """Register a new device of ``user`` with these keys; return its address."""
        request = keys_pb2.RegisterDeviceRequest(
            tenant=tenant,
            user=user,
            identity_key=identity.public_key,
            identity_dh_key=identity.dh_public_key,
            identity_dh_signature=identity.dh_signature(),
            signed_prekey=_signed_pb(signed_prekey),
            one_time_prekeys=[_one_time_pb(p) for p in one_time_prekeys],
            proof=identity.registration_proof(tenant, user),
        )
        response = await self._call(self._stub.RegisterDevice(request, timeout=self._timeout))
        return from_pb(response.address)

    async def publish_prekeys(
        self,
        identity: Identity,
        device: Address,
        *,
        signed_prekey: Prekey | None = None,
        one_time_prekeys: Sequence[Prekey] = (),
    ) -> int:
        """Upload one-time prekeys and/or a new signed prekey; return how many remain."""
        request = keys_pb2.PublishPrekeysRequest(
            device=to_pb(device), one_time_prekeys=[_one_time_pb(p) for p in one_time_prekeys]
        )
        if signed_prekey is not None:
            request.signed_prekey.CopyFrom(_signed_pb(signed_prekey))
        metadata = sign_request_metadata(
            PUBLISH_PREKEYS_METHOD, device, identity.signing_key, request, self._clock
        )
        response = await self._call(
            self._stub.PublishPrekeys(request, metadata=metadata, timeout=self._timeout)
        )
        return response.one_time_prekeys_remaining

    async def count_one_time_prekeys(self, identity: Identity, device: Address) -> int:
        """How many one-time prekeys of ``device`` are still unclaimed."""
        request = keys_pb2.CountOneTimePrekeysRequest(device=to_pb(device))
        metadata = sign_request_metadata(
            COUNT_ONE_TIME_PREKEYS_METHOD, device, identity.signing_key, request, self._clock
        )
        response = await self._call(
            self._stub.CountOneTimePrekeys(request, metadata=metadata, timeout=self._timeout)
        )
        return response.count

    async def fetch_bundles(
        self, tenant: str, user: str, devices: Sequence[int] = ()
    ) -> list[PrekeyBundle]:
        """Prekey bundles of ``user``'s devices (all when ``devices`` is empty).

        Claims one one-time prekey per device. Raises Unauthenticated if a bundle's
        signatures do not verify against its identity key.
        """
        request = keys_pb2.FetchPrekeyBundlesRequest(tenant=tenant, user=user, devices=devices)
        response = await self._call(self._stub.FetchPrekeyBundles(request, timeout=self._timeout))
        return [_verified_bundle(b) for b in response.bundles]

    async def list_devices(self, tenant: str, user: str) -> list[DeviceInfo]:
        """The registered devices of ``user`` (empty if the user has none)."""
        request = keys_pb2.ListDevicesRequest(tenant=tenant, user=user)
        response = await self._call(self._stub.ListDevices(request, timeout=self._timeout))
        return [
            DeviceInfo(from_pb(d.address), d.identity_key, d.registered_at_ms)
            for d in response.devices
        ]

    async def identity_key(self, device: Address) -> bytes:
        """The Ed25519 identity key of ``device``."""
        request = keys_pb2.GetIdentityKeyRequest(device=to_pb(device))
        response = await self._call(self._stub.GetIdentityKey(request, timeout=self._timeout))
        return response.identity_key


def _signed_pb(prekey: Prekey) -> keys_pb2.SignedPrekey:
    return keys_pb2.SignedPrekey(
        key_id=prekey.key_id, public_key=prekey.public, signature=prekey.signature
    )


def _one_time_pb(prekey: Prekey) -> keys_pb2.OneTimePrekey:
    return keys_pb2.OneTimePrekey(key_id=prekey.key_id, public_key=prekey.public)


def _verified_bundle(bundle: keys_pb2.PrekeyBundle) -> PrekeyBundle:
    address = from_pb(bundle.address)
    ik = bundle.identity_key
    spk = bundle.signed_prekey
    if not authproof.verify(
        ik, bundle.identity_dh_signature, authproof.identity_dh_transcript(bundle.identity_dh_key)
    ) or not authproof.verify(
        ik, spk.signature, authproof.signed_prekey_transcript(spk.public_key)
    ):
        raise Unauthenticated(f"prekey bundle of {address} has an invalid signature")
    one_time = None
    if bundle.HasField("one_time_prekey"):
        one_time = PublicPrekey(bundle.one_time_prekey.key_id, bundle.one_time_prekey.public_key)
    return PrekeyBundle(
        address,
        ik,
        bundle.identity_dh_key,
        bundle.identity_dh_signature,
        PublicPrekey(spk.key_id, spk.public_key, spk.signature),
        one_time,
    )
