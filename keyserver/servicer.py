"""The KeyDirectory gRPC service: protobuf <-> model translation around the core."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

import grpc

from keyserver import model
from keyserver.client import (
    APPROVE_LINK_METHOD,
    AUTHORIZATION_HEADER,
    COUNT_ONE_TIME_PREKEYS_METHOD,
    FETCH_PREKEY_BUNDLES_METHOD,
    GET_DEVICE_LIST_METHOD,
    GET_IDENTITY_KEY_METHOD,
    LIST_DEVICES_METHOD,
    LIST_LINK_REQUESTS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    REMOVE_DEVICE_METHOD,
    request_body,
)
from keyserver.directory import KeyDirectory
from keyserver.metrics import KeyserverMetrics
from relay import authproof
from relay.common.convert import (
    address_from_pb,
    address_to_pb,
    device_list_from_pb,
    device_list_to_pb,
)
from relay.common.status import unary
from relay.common.tls import BEARER_NEEDS_TLS, call_is_protected
from relay.errors import InvalidArgument, Unauthenticated
from relay.model import Address
from relaypb.keys.v1 import keys_pb2 as pb
from relaypb.keys.v1 import keys_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext

_TIME_RE = re.compile(r"[0-9]{1,19}")


def _signed_prekey(msg: pb.SignedPrekey) -> model.SignedPrekey:
    return model.SignedPrekey(msg.key_id, msg.public_key, msg.signature)


def _one_time_prekeys(msgs: Iterable[pb.OneTimePrekey]) -> tuple[model.OneTimePrekey, ...]:
    return tuple(model.OneTimePrekey(m.key_id, m.public_key) for m in msgs)


def _pq_prekey(msg: pb.PqPrekey) -> model.PqPrekey:
    return model.PqPrekey(msg.key_id, msg.public_key, msg.signature)


def _pq_prekeys(msgs: Iterable[pb.PqPrekey]) -> tuple[model.PqPrekey, ...]:
    return tuple(_pq_prekey(m) for m in msgs)


def _pq_prekey_pb(key: model.PqPrekey) -> pb.PqPrekey:
    return pb.PqPrekey(key_id=key.key_id, public_key=key.public_key, signature=key.signature)


def _status_pb(status: model.PrekeyStatus) -> pb.PrekeyStatus:
    return pb.PrekeyStatus(
        one_time_prekeys=status.one_time_prekeys,
        one_time_pq_prekeys=status.one_time_pq_prekeys,
        low_water_mark=status.low_water_mark,
        replenish=status.replenish,
        has_last_resort_pq_prekey=status.has_last_resort_pq_prekey,
    )


def _signed_prekey_pb(spk: model.SignedPrekey) -> pb.SignedPrekey:
    return pb.SignedPrekey(key_id=spk.key_id, public_key=spk.public_key, signature=spk.signature)


def _bundle_pb(bundle: model.PrekeyBundle) -> pb.PrekeyBundle:
    device = bundle.device
    msg = pb.PrekeyBundle(
        address=address_to_pb(device.address),
        identity_key=device.identity_key,
        identity_dh_key=device.identity_dh_key,
        identity_dh_signature=device.identity_dh_signature,
        registration_id=device.registration_id,
        pq_prekey_last_resort=bundle.pq_last_resort,
    )
    if bundle.pq_prekey is not None:
        msg.pq_prekey.CopyFrom(_pq_prekey_pb(bundle.pq_prekey))
    if bundle.signed_prekey is not None:
        msg.signed_prekey.CopyFrom(_signed_prekey_pb(bundle.signed_prekey))
    if bundle.one_time_prekey is not None:
        otk = bundle.one_time_prekey
        msg.one_time_prekey.CopyFrom(pb.OneTimePrekey(key_id=otk.key_id, public_key=otk.public_key))
    return msg


def _bearer(context: Context[Req, Resp]) -> str | None:
    """The bearer key of the call, if it carries an ``authorization`` header.

    Refused unless the call came over TLS or from this machine (see BEARER_NEEDS_TLS).
    """
    values = [v for k, v in context.invocation_metadata() or () if k == AUTHORIZATION_HEADER]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise Unauthenticated(f"header {AUTHORIZATION_HEADER} must be given once, as text")
    scheme, _, key = values[0].partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated(f"header {AUTHORIZATION_HEADER} must be 'Bearer <key>'")
    if not call_is_protected(context):
        raise Unauthenticated(BEARER_NEEDS_TLS)
    return key.strip()


def _headers(
    context: Context[Req, Resp], needs: str = "this method needs a signed request"
) -> dict[str, str | bytes]:
    headers: dict[str, str | bytes] = {}
    wanted = (
        authproof.REQUEST_DEVICE_HEADER,
        authproof.REQUEST_TIME_HEADER,
        authproof.REQUEST_SIGNATURE_HEADER,
    )
    for key, value in context.invocation_metadata() or ():
        if key in wanted or key == authproof.REQUEST_NONCE_HEADER:
            if key in headers:
                raise Unauthenticated(f"header {key} is given more than once")
            headers[key] = value
    for key in wanted:
        if key not in headers:
            raise Unauthenticated(f"missing header {key}: {needs}")
    return headers


class KeyDirectoryServicer(keys_pb2_grpc.KeyDirectoryServicer):
    """Serves relaypb.keys.v1.KeyDirectory by calling a KeyDirectory core."""

    def __init__(self, core: KeyDirectory, metrics: KeyserverMetrics | None = None) -> None:
        self._core = core
        self._linking = core.linking
        self._metrics = metrics or KeyserverMetrics()

    def _status(self, status: model.PrekeyStatus) -> pb.PrekeyStatus:
        """The status message; a replenish signal is counted."""
        if status.replenish:
            self._metrics.replenish.inc()
        return _status_pb(status)

    async def _reader(self, method: str, body: bytes, context: Context[Req, Resp]) -> model.Reader:
        """Who makes an authenticated read: a bearer key holder, or a signing device."""
        key = _bearer(context)
        if key is not None:
            return self._core.authenticate_bearer(key)
        device = await self._authenticate(
            method,
            body,
            context,
            "reads need a request signed by a device of the tenant, or a bearer key "
            "('authorization: Bearer <key>')",
        )
        return await self._core.device_reader(device)

    async def _authenticate(
        self,
        method: str,
        body: bytes,
        context: Context[Req, Resp],
        needs: str = "this method needs a signed request",
    ) -> Address:
        headers = _headers(context, needs)
        device = headers[authproof.REQUEST_DEVICE_HEADER]
        time = headers[authproof.REQUEST_TIME_HEADER]
        signature = headers[authproof.REQUEST_SIGNATURE_HEADER]
        try:
            address = authproof.parse_address(device if isinstance(device, str) else "")
        except ValueError as exc:
            raise Unauthenticated(
                f"header {authproof.REQUEST_DEVICE_HEADER} is not tenant/user/device"
            ) from exc
        if not isinstance(time, str) or not _TIME_RE.fullmatch(time):
            raise Unauthenticated(
                f"header {authproof.REQUEST_TIME_HEADER} is not a time in milliseconds"
            )
        if not isinstance(signature, bytes):
            raise Unauthenticated(f"header {authproof.REQUEST_SIGNATURE_HEADER} is not binary")
        nonce = headers.get(authproof.REQUEST_NONCE_HEADER, b"")
        if not isinstance(nonce, bytes) or len(nonce) > authproof.REQUEST_NONCE_BYTES:
            raise Unauthenticated(
                f"header {authproof.REQUEST_NONCE_HEADER} must be at most "
                f"{authproof.REQUEST_NONCE_BYTES} bytes, binary"
            )
        return await self._core.authenticate(
            method, address, int(time), body, signature, nonce=nonce
        )

    @unary
    async def RegisterDevice(
        self,
        request: pb.RegisterDeviceRequest,
        context: Context[pb.RegisterDeviceRequest, pb.RegisterDeviceResponse],
    ) -> pb.RegisterDeviceResponse:
        """Register a new device of a user; returns its address."""
        has_spk = request.HasField("signed_prekey")
        registration = model.Registration(
            tenant=request.tenant,
            user=request.user,
            identity_key=request.identity_key,
            identity_dh_key=request.identity_dh_key,
            identity_dh_signature=request.identity_dh_signature,
            signed_prekey=_signed_prekey(request.signed_prekey) if has_spk else None,
            one_time_prekeys=_one_time_prekeys(request.one_time_prekeys),
            proof=request.proof,
            last_resort_pq_prekey=(
                _pq_prekey(request.last_resort_pq_prekey)
                if request.HasField("last_resort_pq_prekey")
                else None
            ),
            one_time_pq_prekeys=_pq_prekeys(request.one_time_pq_prekeys),
            account_key=request.account_key,
            device_list=(
                device_list_from_pb(request.device_list)
                if request.HasField("device_list")
                else None
            ),
            registration_token=request.registration_token,
            reset=request.reset,
        )
        with self._metrics.outcome(self._metrics.registrations):
            record = await self._core.register(registration)
        return pb.RegisterDeviceResponse(
            address=address_to_pb(record.address), registration_id=record.registration_id
        )

    @unary
    async def PublishPrekeys(
        self,
        request: pb.PublishPrekeysRequest,
        context: Context[pb.PublishPrekeysRequest, pb.PublishPrekeysResponse],
    ) -> pb.PublishPrekeysResponse:
        """Rotate signed prekeys and/or add one-time prekeys (device-signed)."""
        caller = await self._authenticate(PUBLISH_PREKEYS_METHOD, request_body(request), context)
        has_spk = request.HasField("signed_prekey")
        has_last_resort = request.HasField("last_resort_pq_prekey")
        status = await self._core.publish_prekeys(
            caller,
            address_from_pb(request.device),
            _signed_prekey(request.signed_prekey) if has_spk else None,
            _one_time_prekeys(request.one_time_prekeys),
            last_resort_pq_prekey=(
                _pq_prekey(request.last_resort_pq_prekey) if has_last_resort else None
            ),
            one_time_pq_prekeys=_pq_prekeys(request.one_time_pq_prekeys),
        )
        return pb.PublishPrekeysResponse(
            one_time_prekeys_remaining=status.one_time_prekeys, status=self._status(status)
        )

    @unary
    async def FetchPrekeyBundles(
        self,
        request: pb.FetchPrekeyBundlesRequest,
        context: Context[pb.FetchPrekeyBundlesRequest, pb.FetchPrekeyBundlesResponse],
    ) -> pb.FetchPrekeyBundlesResponse:
        """Prekey bundles of a user's devices, claiming one one-time prekey each."""
        reader = await self._reader(FETCH_PREKEY_BUNDLES_METHOD, request_body(request), context)
        bundles = await self._core.fetch_bundles(
            request.tenant, request.user, request.devices, by=reader
        )
        for bundle in bundles:
            if bundle.one_time_prekey is None:
                self._metrics.bundle_empty.inc()
            else:
                self._metrics.bundle_claimed.inc()
        return pb.FetchPrekeyBundlesResponse(bundles=[_bundle_pb(b) for b in bundles])

    @unary
    async def ListDevices(
        self,
        request: pb.ListDevicesRequest,
        context: Context[pb.ListDevicesRequest, pb.ListDevicesResponse],
    ) -> pb.ListDevicesResponse:
        """The registered devices of a user."""
        reader = await self._reader(LIST_DEVICES_METHOD, request_body(request), context)
        records = await self._core.list_devices(request.tenant, request.user, by=reader)
        return pb.ListDevicesResponse(
            devices=[
                pb.DeviceInfo(
                    address=address_to_pb(r.address),
                    identity_key=r.identity_key,
                    registered_at_ms=r.registered_at_ms,
                    registration_id=r.registration_id,
                )
                for r in records
            ]
        )

    @unary
    async def CountOneTimePrekeys(
        self,
        request: pb.CountOneTimePrekeysRequest,
        context: Context[pb.CountOneTimePrekeysRequest, pb.CountOneTimePrekeysResponse],
    ) -> pb.CountOneTimePrekeysResponse:
        """How full the one-time pools of the signing device are (device-signed)."""
        body = request_body(request)
        caller = await self._authenticate(COUNT_ONE_TIME_PREKEYS_METHOD, body, context)
        status = await self._core.prekey_status(caller, address_from_pb(request.device))
        return pb.CountOneTimePrekeysResponse(
            count=status.one_time_prekeys, status=self._status(status)
        )

    @unary
    async def GetIdentityKey(
        self,
        request: pb.GetIdentityKeyRequest,
        context: Context[pb.GetIdentityKeyRequest, pb.GetIdentityKeyResponse],
    ) -> pb.GetIdentityKeyResponse:
        """The Ed25519 identity key of one device."""
        reader = await self._reader(GET_IDENTITY_KEY_METHOD, request_body(request), context)
        key = await self._core.identity_key(address_from_pb(request.device), by=reader)
        return pb.GetIdentityKeyResponse(identity_key=key)

    @unary
    async def RemoveDevice(
        self,
        request: pb.RemoveDeviceRequest,
        context: Context[pb.RemoveDeviceRequest, pb.RemoveDeviceResponse],
    ) -> pb.RemoveDeviceResponse:
        """Remove a device of the signing device's own user (device-signed)."""
        caller = await self._authenticate(REMOVE_DEVICE_METHOD, request_body(request), context)
        device_list = (
            device_list_from_pb(request.device_list) if request.HasField("device_list") else None
        )
        with self._metrics.outcome(self._metrics.removals):
            await self._core.remove_device(caller, address_from_pb(request.device), device_list)
        return pb.RemoveDeviceResponse()

    @unary
    async def GetDeviceList(
        self,
        request: pb.GetDeviceListRequest,
        context: Context[pb.GetDeviceListRequest, pb.GetDeviceListResponse],
    ) -> pb.GetDeviceListResponse:
        """The user's latest signed device list (authenticated read)."""
        reader = await self._reader(GET_DEVICE_LIST_METHOD, request_body(request), context)
        device_list = await self._core.device_list(request.tenant, request.user, by=reader)
        return pb.GetDeviceListResponse(device_list=device_list_to_pb(device_list))

    @unary
    async def RequestLink(
        self,
        request: pb.RequestLinkRequest,
        context: Context[pb.RequestLinkRequest, pb.RequestLinkResponse],
    ) -> pb.RequestLinkResponse:
        """A new device asks to join an existing user."""
        with self._metrics.outcome(self._metrics.links, "request"):
            link = await self._request_link(request)
        return pb.RequestLinkResponse(request_id=link.request_id, expires_at_ms=link.expires_at_ms)

    async def _request_link(self, request: pb.RequestLinkRequest) -> model.PendingLink:
        return await self._linking.request(
            model.LinkRequestInput(
                tenant=request.tenant,
                user=request.user,
                identity_key=request.identity_key,
                identity_dh_key=request.identity_dh_key,
                identity_dh_signature=request.identity_dh_signature,
                signed_prekey=(
                    _signed_prekey(request.signed_prekey)
                    if request.HasField("signed_prekey")
                    else None
                ),
                last_resort_pq_prekey=(
                    _pq_prekey(request.last_resort_pq_prekey)
                    if request.HasField("last_resort_pq_prekey")
                    else None
                ),
                link_key=request.link_key,
                proof=request.proof,
            )
        )

    @unary
    async def ListLinkRequests(
        self,
        request: pb.ListLinkRequestsRequest,
        context: Context[pb.ListLinkRequestsRequest, pb.ListLinkRequestsResponse],
    ) -> pb.ListLinkRequestsResponse:
        """The waiting link requests of the signing device's user (device-signed)."""
        body = request_body(request)
        caller = await self._authenticate(LIST_LINK_REQUESTS_METHOD, body, context)
        links, device_list, next_device = await self._linking.pending(caller)
        return pb.ListLinkRequestsResponse(
            requests=[
                pb.LinkRequest(
                    request_id=link.request_id,
                    identity_key=link.identity_key,
                    identity_dh_key=link.identity_dh_key,
                    link_key=link.link_key,
                    created_at_ms=link.created_at_ms,
                    expires_at_ms=link.expires_at_ms,
                )
                for link in links
            ],
            device_list=device_list_to_pb(device_list),
            next_device=next_device,
        )

    @unary
    async def ApproveLink(
        self,
        request: pb.ApproveLinkRequest,
        context: Context[pb.ApproveLinkRequest, pb.ApproveLinkResponse],
    ) -> pb.ApproveLinkResponse:
        """Approve a link request with the new list and the sealed account key."""
        caller = await self._authenticate(APPROVE_LINK_METHOD, request_body(request), context)
        if not request.HasField("device_list"):
            raise InvalidArgument("device_list is required: the new list with the new device")
        with self._metrics.outcome(self._metrics.links, "approve"):
            address = await self._linking.approve(
                caller,
                request.request_id,
                device_list_from_pb(request.device_list),
                request.sealed_account,
            )
        return pb.ApproveLinkResponse(address=address_to_pb(address))

    @unary
    async def CompleteLink(
        self,
        request: pb.CompleteLinkRequest,
        context: Context[pb.CompleteLinkRequest, pb.CompleteLinkResponse],
    ) -> pb.CompleteLinkResponse:
        """The new device's side of a link: waiting, or approved with the sealed key."""
        link = await self._linking.complete(request.request_id)
        if link.approval is None:
            return pb.CompleteLinkResponse(
                state=pb.CompleteLinkResponse.PENDING, expires_at_ms=link.expires_at_ms
            )
        approval = link.approval
        return pb.CompleteLinkResponse(
            state=pb.CompleteLinkResponse.APPROVED,
            address=address_to_pb(Address(link.tenant, link.user, approval.device)),
            sealed_account=approval.sealed_account,
            device_list=device_list_to_pb(approval.device_list),
            expires_at_ms=link.expires_at_ms,
        )
