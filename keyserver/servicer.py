"""The KeyDirectory gRPC service: protobuf <-> model translation around the core."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

import grpc

from keyserver import model
from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    PUBLISH_PREKEYS_METHOD,
    REMOVE_DEVICE_METHOD,
    request_body,
)
from keyserver.directory import KeyDirectory
from relay import authproof
from relay.errors import Unauthenticated
from relay.model import Address
from relay.server.convert import address_from_pb, address_to_pb
from relay.server.status import unary
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


def _headers(context: Context[Req, Resp]) -> dict[str, str | bytes]:
    headers: dict[str, str | bytes] = {}
    wanted = (
        authproof.REQUEST_DEVICE_HEADER,
        authproof.REQUEST_TIME_HEADER,
        authproof.REQUEST_SIGNATURE_HEADER,
    )
    for key, value in context.invocation_metadata() or ():
        if key in wanted:
            if key in headers:
                raise Unauthenticated(f"header {key} is given more than once")
            headers[key] = value
    for key in wanted:
        if key not in headers:
            raise Unauthenticated(f"missing header {key}: this method needs a signed request")
    return headers


class KeyDirectoryServicer(keys_pb2_grpc.KeyDirectoryServicer):
    """Serves relaypb.keys.v1.KeyDirectory by calling a KeyDirectory core."""

    def __init__(self, core: KeyDirectory) -> None:
        self._core = core

    async def _authenticate(self, method: str, body: bytes, context: Context[Req, Resp]) -> Address:
        headers = _headers(context)
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
        return await self._core.authenticate(method, address, int(time), body, signature)

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
        )
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
            one_time_prekeys_remaining=status.one_time_prekeys, status=_status_pb(status)
        )

    @unary
    async def FetchPrekeyBundles(
        self,
        request: pb.FetchPrekeyBundlesRequest,
        context: Context[pb.FetchPrekeyBundlesRequest, pb.FetchPrekeyBundlesResponse],
    ) -> pb.FetchPrekeyBundlesResponse:
        """Prekey bundles of a user's devices, claiming one one-time prekey each."""
        bundles = await self._core.fetch_bundles(request.tenant, request.user, request.devices)
        return pb.FetchPrekeyBundlesResponse(bundles=[_bundle_pb(b) for b in bundles])

    @unary
    async def ListDevices(
        self,
        request: pb.ListDevicesRequest,
        context: Context[pb.ListDevicesRequest, pb.ListDevicesResponse],
    ) -> pb.ListDevicesResponse:
        """The registered devices of a user."""
        records = await self._core.list_devices(request.tenant, request.user)
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
            count=status.one_time_prekeys, status=_status_pb(status)
        )

    @unary
    async def GetIdentityKey(
        self,
        request: pb.GetIdentityKeyRequest,
        context: Context[pb.GetIdentityKeyRequest, pb.GetIdentityKeyResponse],
    ) -> pb.GetIdentityKeyResponse:
        """The Ed25519 identity key of one device."""
        key = await self._core.identity_key(address_from_pb(request.device))
        return pb.GetIdentityKeyResponse(identity_key=key)

    @unary
    async def RemoveDevice(
        self,
        request: pb.RemoveDeviceRequest,
        context: Context[pb.RemoveDeviceRequest, pb.RemoveDeviceResponse],
    ) -> pb.RemoveDeviceResponse:
        """Remove a device of the signing device's own user (device-signed)."""
        caller = await self._authenticate(REMOVE_DEVICE_METHOD, request_body(request), context)
        await self._core.remove_device(caller, address_from_pb(request.device))
        return pb.RemoveDeviceResponse()
