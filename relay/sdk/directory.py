"""Async client of the key directory (relaypb.keys.v1.KeyDirectory).

Keys go up and come down as the public types of :mod:`relay.sdk.crypto.bundle`; every
bundle fetched is verified here too (each signature, and the registration id against
the identity key), so a directory that forges or swaps a key is caught before any DH.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from keyserver.client import (
    APPROVE_LINK_METHOD,
    COUNT_ONE_TIME_PREKEYS_METHOD,
    FETCH_PREKEY_BUNDLES_METHOD,
    GET_DEVICE_LIST_METHOD,
    GET_IDENTITY_KEY_METHOD,
    LIST_DEVICES_METHOD,
    LIST_LINK_REQUESTS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    REMOVE_DEVICE_METHOD,
    Metadata,
    bearer_metadata,
    sign_request_metadata,
)
from relay.accounts import DeviceList
from relay.clock import Clock, SystemClock
from relay.common.convert import device_list_from_pb, device_list_to_pb
from relay.errors import FailedPrecondition, Unauthenticated
from relay.model import Address, registration_id
from relay.sdk.crypto.bundle import (
    OneTimePrekey,
    PqPrekey,
    PrekeyBundle,
    PublicIdentity,
    SignedPrekey,
)
from relay.sdk.crypto.errors import BadSignature
from relay.sdk.keys import Identity
from relay.sdk.status import Endpoint, from_rpc_error
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
    #: ``relay.model.registration_id(identity_key)``: changes when the device re-registers.
    registration_id: int


@dataclass(frozen=True, slots=True)
class DeviceBundle:
    """A verified prekey bundle of one device, ready for ``pqxdh.initiate``."""

    address: Address
    registration_id: int
    bundle: PrekeyBundle


@dataclass(frozen=True, slots=True)
class LinkRequestInfo:
    """A link request waiting for approval, as a device of the user sees it."""

    request_id: bytes
    identity_key: bytes
    identity_dh_key: bytes
    link_key: bytes
    created_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class LinkRequests:
    """The waiting link requests of a user, its current list and next device number."""

    requests: tuple[LinkRequestInfo, ...]
    device_list: DeviceList
    next_device: int


@dataclass(frozen=True, slots=True)
class LinkState:
    """The new device's side of a link request: approved (with what it needs) or not."""

    approved: bool
    expires_at_ms: int
    address: Address | None = None
    sealed_account: bytes = b""
    device_list: DeviceList | None = None


@dataclass(frozen=True, slots=True)
class PrekeyStatus:
    """How full a device's one-time pools are on the key directory.

    ``replenish`` is set when either pool holds at most ``low_water_mark`` keys or the
    last-resort PQ prekey is missing: then call ``relay.sdk.device.replenish_prekeys``.
    """

    one_time_prekeys: int
    one_time_pq_prekeys: int
    low_water_mark: int
    replenish: bool
    has_last_resort_pq_prekey: bool


def to_pb(address: Address) -> address_pb2.Address:
    """The protobuf form of ``address``."""
    return address_pb2.Address(tenant=address.tenant, user=address.user, device=address.device)


def from_pb(address: address_pb2.Address) -> Address:
    """The domain form of a protobuf address."""
    return Address(address.tenant, address.user, address.device)


class KeyDirectoryClient:
    """Register and remove devices, publish and fetch prekeys, list devices.

    The caller owns ``channel``. Failures raise relay.errors exceptions (``Unavailable``
    when the directory cannot be reached, ``NotFound``, ``Unauthenticated``, ...).
    Device-signed calls (publish, status, remove, links) are signed with the identity
    passed in. Reads (bundles, devices, lists, identity keys) need credentials too: the
    device set with :meth:`sign_as` (registering does it), or a tenant API key
    (``bearer_key``) for a service. ``target`` names the directory in error messages:
    its ``host:port``, or an Endpoint that also says how the channel reaches it (TLS,
    which CA), so that a failed TLS handshake says which certificate did not verify.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        target: str | Endpoint = "",
        clock: Clock | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        bearer_key: str = "",
    ) -> None:
        self._stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        self._target = target if isinstance(target, Endpoint) else Endpoint("key directory", target)
        self._clock = clock or SystemClock()
        self._timeout = timeout
        self._bearer = bearer_key
        self._signer: tuple[Identity, Address] | None = None

    def sign_as(self, identity: Identity, address: Address) -> None:
        """Sign reads from now on as device ``address`` holding ``identity``."""
        self._signer = (identity, address)

    def _read_metadata(self, method: str, request: Message) -> Metadata:
        if self._signer is not None:
            identity, address = self._signer
            return sign_request_metadata(
                method, address, identity.signing_key, request, self._clock
            )
        if self._bearer:
            return bearer_metadata(self._bearer)
        return ()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, target=self._target) from exc

    async def register(
        self,
        identity: Identity,
        tenant: str,
        user: str,
        *,
        signed_prekey: SignedPrekey,
        one_time: Sequence[OneTimePrekey],
        last_resort_pq: PqPrekey,
        one_time_pq: Sequence[PqPrekey] = (),
        device_list: DeviceList,
        registration_token: str = "",
        reset: bool = False,
    ) -> Address:
        """Create the account of ``user`` with this first device; return its address.

        ``device_list`` is the account's first list, signed by the new account key. At
        most ``max_one_time_prekeys_per_request`` (100 by default) keys of each pool fit
        in one registration; publish more with :meth:`publish_prekeys`. Raises
        AlreadyExists for a user that exists (link the device instead).
        """
        request = keys_pb2.RegisterDeviceRequest(
            tenant=tenant,
            user=user,
            identity_key=identity.public_key,
            identity_dh_key=identity.dh_public_key,
            identity_dh_signature=identity.dh_signature(),
            signed_prekey=_signed_pb(signed_prekey),
            one_time_prekeys=[_one_time_pb(p) for p in one_time],
            proof=identity.registration_proof(tenant, user),
            last_resort_pq_prekey=_pq_pb(last_resort_pq),
            one_time_pq_prekeys=[_pq_pb(p) for p in one_time_pq],
            account_key=device_list.account_key,
            device_list=device_list_to_pb(device_list),
            registration_token=registration_token,
            reset=reset,
        )
        response = await self._call(self._stub.RegisterDevice(request, timeout=self._timeout))
        return from_pb(response.address)

    async def request_link(
        self,
        identity: Identity,
        tenant: str,
        user: str,
        *,
        signed_prekey: SignedPrekey,
        last_resort_pq: PqPrekey,
        link_key: bytes,
    ) -> tuple[bytes, int]:
        """Ask to join ``user`` as a new device; return (request id, expiry in ms)."""
        request = keys_pb2.RequestLinkRequest(
            tenant=tenant,
            user=user,
            identity_key=identity.public_key,
            identity_dh_key=identity.dh_public_key,
            identity_dh_signature=identity.dh_signature(),
            signed_prekey=_signed_pb(signed_prekey),
            last_resort_pq_prekey=_pq_pb(last_resort_pq),
            link_key=link_key,
            proof=identity.link_proof(tenant, user, link_key),
        )
        response = await self._call(self._stub.RequestLink(request, timeout=self._timeout))
        return response.request_id, response.expires_at_ms

    async def list_link_requests(self, identity: Identity, device: Address) -> LinkRequests:
        """The link requests waiting on ``device``'s user (signed by ``device``)."""
        request = keys_pb2.ListLinkRequestsRequest()
        metadata = sign_request_metadata(
            LIST_LINK_REQUESTS_METHOD, device, identity.signing_key, request, self._clock
        )
        response = await self._call(
            self._stub.ListLinkRequests(request, metadata=metadata, timeout=self._timeout)
        )
        return LinkRequests(
            tuple(
                LinkRequestInfo(
                    r.request_id,
                    r.identity_key,
                    r.identity_dh_key,
                    r.link_key,
                    r.created_at_ms,
                    r.expires_at_ms,
                )
                for r in response.requests
            ),
            device_list_from_pb(response.device_list),
            response.next_device,
        )

    async def approve_link(
        self,
        identity: Identity,
        device: Address,
        request_id: bytes,
        device_list: DeviceList,
        sealed_account: bytes,
    ) -> Address:
        """Approve a link request (signed by ``device``); return the new device's address."""
        request = keys_pb2.ApproveLinkRequest(
            request_id=request_id,
            device_list=device_list_to_pb(device_list),
            sealed_account=sealed_account,
        )
        metadata = sign_request_metadata(
            APPROVE_LINK_METHOD, device, identity.signing_key, request, self._clock
        )
        response = await self._call(
            self._stub.ApproveLink(request, metadata=metadata, timeout=self._timeout)
        )
        return from_pb(response.address)

    async def complete_link(self, request_id: bytes) -> LinkState:
        """Whether link request ``request_id`` was approved (NotFound once it expired)."""
        request = keys_pb2.CompleteLinkRequest(request_id=request_id)
        response = await self._call(self._stub.CompleteLink(request, timeout=self._timeout))
        if response.state != keys_pb2.CompleteLinkResponse.APPROVED:
            return LinkState(False, response.expires_at_ms)
        return LinkState(
            True,
            response.expires_at_ms,
            from_pb(response.address),
            response.sealed_account,
            device_list_from_pb(response.device_list),
        )

    async def device_list(self, tenant: str, user: str) -> DeviceList:
        """The latest signed device list of ``user`` (not verified here: see relay.sdk.accounts)."""
        request = keys_pb2.GetDeviceListRequest(tenant=tenant, user=user)
        metadata = self._read_metadata(GET_DEVICE_LIST_METHOD, request)
        response = await self._call(
            self._stub.GetDeviceList(request, metadata=metadata, timeout=self._timeout)
        )
        return device_list_from_pb(response.device_list)

    async def publish_prekeys(
        self,
        identity: Identity,
        device: Address,
        *,
        signed_prekey: SignedPrekey | None = None,
        one_time: Sequence[OneTimePrekey] = (),
        last_resort_pq: PqPrekey | None = None,
        one_time_pq: Sequence[PqPrekey] = (),
    ) -> PrekeyStatus:
        """Upload one-time prekeys and/or new signed or last-resort keys; return the status."""
        request = keys_pb2.PublishPrekeysRequest(
            device=to_pb(device),
            one_time_prekeys=[_one_time_pb(p) for p in one_time],
            one_time_pq_prekeys=[_pq_pb(p) for p in one_time_pq],
        )
        if signed_prekey is not None:
            request.signed_prekey.CopyFrom(_signed_pb(signed_prekey))
        if last_resort_pq is not None:
            request.last_resort_pq_prekey.CopyFrom(_pq_pb(last_resort_pq))
        metadata = sign_request_metadata(
            PUBLISH_PREKEYS_METHOD, device, identity.signing_key, request, self._clock
        )
        response = await self._call(
            self._stub.PublishPrekeys(request, metadata=metadata, timeout=self._timeout)
        )
        return _status(response.status)

    async def prekey_status(self, identity: Identity, device: Address) -> PrekeyStatus:
        """How full the one-time pools of ``device`` are, and whether to replenish them."""
        request = keys_pb2.CountOneTimePrekeysRequest(device=to_pb(device))
        metadata = sign_request_metadata(
            COUNT_ONE_TIME_PREKEYS_METHOD, device, identity.signing_key, request, self._clock
        )
        response = await self._call(
            self._stub.CountOneTimePrekeys(request, metadata=metadata, timeout=self._timeout)
        )
        return _status(response.status)

    async def count_one_time_prekeys(self, identity: Identity, device: Address) -> int:
        """How many one-time X25519 prekeys of ``device`` are still unclaimed."""
        return (await self.prekey_status(identity, device)).one_time_prekeys

    async def remove_device(
        self, identity: Identity, caller: Address, device: Address, device_list: DeviceList
    ) -> None:
        """Remove ``device`` (``caller`` itself or another device of its user).

        Signed by ``caller`` with ``identity``; ``device_list`` is the user's new list
        without ``device``, signed by the account key. Raises PermissionDenied for a
        device of another user, NotFound for an unknown or already removed one.
        """
        request = keys_pb2.RemoveDeviceRequest(
            device=to_pb(device), device_list=device_list_to_pb(device_list)
        )
        metadata = sign_request_metadata(
            REMOVE_DEVICE_METHOD, caller, identity.signing_key, request, self._clock
        )
        await self._call(self._stub.RemoveDevice(request, metadata=metadata, timeout=self._timeout))

    async def fetch_bundles(
        self, tenant: str, user: str, devices: Sequence[int] = ()
    ) -> list[DeviceBundle]:
        """Verified prekey bundles of ``user``'s devices (all when ``devices`` is empty).

        Claims one one-time X25519 and one one-time PQ prekey per device. Raises
        Unauthenticated naming the device and key if a signature does not verify or the
        registration id does not match the identity key, and FailedPrecondition for a
        device that has published no signed or no PQ prekey (an SDK older than PQXDH).
        """
        request = keys_pb2.FetchPrekeyBundlesRequest(tenant=tenant, user=user, devices=devices)
        metadata = self._read_metadata(FETCH_PREKEY_BUNDLES_METHOD, request)
        response = await self._call(
            self._stub.FetchPrekeyBundles(request, metadata=metadata, timeout=self._timeout)
        )
        return [_verified_bundle(b) for b in response.bundles]

    async def list_devices(self, tenant: str, user: str) -> list[DeviceInfo]:
        """The registered devices of ``user`` (empty if the user has none)."""
        request = keys_pb2.ListDevicesRequest(tenant=tenant, user=user)
        metadata = self._read_metadata(LIST_DEVICES_METHOD, request)
        response = await self._call(
            self._stub.ListDevices(request, metadata=metadata, timeout=self._timeout)
        )
        return [
            DeviceInfo(from_pb(d.address), d.identity_key, d.registered_at_ms, d.registration_id)
            for d in response.devices
        ]

    async def identity_key(self, device: Address) -> bytes:
        """The Ed25519 identity key of ``device``."""
        request = keys_pb2.GetIdentityKeyRequest(device=to_pb(device))
        metadata = self._read_metadata(GET_IDENTITY_KEY_METHOD, request)
        response = await self._call(
            self._stub.GetIdentityKey(request, metadata=metadata, timeout=self._timeout)
        )
        return response.identity_key


def _status(status: keys_pb2.PrekeyStatus) -> PrekeyStatus:
    return PrekeyStatus(
        one_time_prekeys=status.one_time_prekeys,
        one_time_pq_prekeys=status.one_time_pq_prekeys,
        low_water_mark=status.low_water_mark,
        replenish=status.replenish,
        has_last_resort_pq_prekey=status.has_last_resort_pq_prekey,
    )


def _signed_pb(prekey: SignedPrekey) -> keys_pb2.SignedPrekey:
    return keys_pb2.SignedPrekey(
        key_id=prekey.key_id, public_key=prekey.public, signature=prekey.signature
    )


def _one_time_pb(prekey: OneTimePrekey) -> keys_pb2.OneTimePrekey:
    return keys_pb2.OneTimePrekey(key_id=prekey.key_id, public_key=prekey.public)


def _pq_pb(prekey: PqPrekey) -> keys_pb2.PqPrekey:
    return keys_pb2.PqPrekey(
        key_id=prekey.key_id, public_key=prekey.public, signature=prekey.signature
    )


def _verified_bundle(msg: keys_pb2.PrekeyBundle) -> DeviceBundle:
    address = from_pb(msg.address)
    if not msg.HasField("signed_prekey") or not msg.HasField("pq_prekey"):
        missing = "signed prekey" if not msg.HasField("signed_prekey") else "PQ prekey"
        raise FailedPrecondition(
            f"device {address} has published no {missing} (registered by an SDK older than "
            "PQXDH?): it cannot receive end-to-end-encrypted messages until it does",
            metadata={"device": str(address), "key": missing},
        )
    spk, pq = msg.signed_prekey, msg.pq_prekey
    one_time = None
    if msg.HasField("one_time_prekey"):
        one_time = OneTimePrekey(msg.one_time_prekey.key_id, msg.one_time_prekey.public_key)
    bundle = PrekeyBundle(
        identity=PublicIdentity(msg.identity_key, msg.identity_dh_key, msg.identity_dh_signature),
        signed_prekey=SignedPrekey(spk.key_id, spk.public_key, spk.signature),
        pq_prekey=PqPrekey(pq.key_id, pq.public_key, pq.signature, msg.pq_prekey_last_resort),
        one_time_prekey=one_time,
    )
    try:
        bundle.verify()
    except BadSignature as exc:
        raise Unauthenticated(
            f"prekey bundle of {address}: bad signature on the {exc.key}",
            metadata={"device": str(address), "key": exc.key},
        ) from exc
    if msg.registration_id != registration_id(msg.identity_key):
        raise Unauthenticated(
            f"prekey bundle of {address}: registration_id {msg.registration_id} does not "
            "match its identity key",
            metadata={"device": str(address), "key": "registration id"},
        )
    return DeviceBundle(address, msg.registration_id, bundle)
