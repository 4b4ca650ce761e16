"""What a device needs to call the key directory's device-signed methods.

A signed request carries four metadata headers (``relay.authproof``): the device
address, the time in milliseconds, a random nonce, and an Ed25519 signature by the
device's identity key over ``request_transcript(method, address, time, body, nonce)``,
where ``body`` is the request's deterministic serialization. The server accepts each
signed request once, and only within a minute of its own clock, so sign right before
sending and never reuse metadata.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

from relay import authproof
from relay.clock import Clock
from relay.model import Address

SERVICE_NAME = "relaypb.keys.v1.KeyDirectory"
#: Full method names, as signed in request transcripts.
PUBLISH_PREKEYS_METHOD = f"/{SERVICE_NAME}/PublishPrekeys"
COUNT_ONE_TIME_PREKEYS_METHOD = f"/{SERVICE_NAME}/CountOneTimePrekeys"
REMOVE_DEVICE_METHOD = f"/{SERVICE_NAME}/RemoveDevice"
FETCH_PREKEY_BUNDLES_METHOD = f"/{SERVICE_NAME}/FetchPrekeyBundles"
LIST_DEVICES_METHOD = f"/{SERVICE_NAME}/ListDevices"
GET_IDENTITY_KEY_METHOD = f"/{SERVICE_NAME}/GetIdentityKey"
GET_DEVICE_LIST_METHOD = f"/{SERVICE_NAME}/GetDeviceList"
LIST_LINK_REQUESTS_METHOD = f"/{SERVICE_NAME}/ListLinkRequests"
APPROVE_LINK_METHOD = f"/{SERVICE_NAME}/ApproveLink"
#: Metadata key of a bearer key (tenant services, relay nodes): ``Bearer <key>``.
AUTHORIZATION_HEADER = "authorization"

Metadata = tuple[tuple[str, str | bytes], ...]


def bearer_metadata(key: str) -> Metadata:
    """The metadata of a read made with a bearer key (a tenant API key or the relay key)."""
    return ((AUTHORIZATION_HEADER, f"Bearer {key}"),)


def request_body(request: Message) -> bytes:
    """The bytes of ``request`` that a signature covers (deterministic serialization)."""
    return request.SerializeToString(deterministic=True)


def sign_request_metadata(
    method: str,
    address: Address,
    signing_key: Ed25519PrivateKey,
    request: Message,
    clock: Clock,
) -> Metadata:
    """Return the metadata that makes ``request`` a request signed by device ``address``.

    ``method`` is the full method name (e.g. ``PUBLISH_PREKEYS_METHOD``); ``signing_key``
    the device's identity key; the time is read once from ``clock``. Pass the result as
    the ``metadata`` of the call, and send ``request`` unchanged after signing.
    """
    time_ms = clock.now_ms()
    nonce = secrets.token_bytes(authproof.REQUEST_NONCE_BYTES)
    transcript = authproof.request_transcript(
        method, address, time_ms, request_body(request), nonce
    )
    return (
        (authproof.REQUEST_DEVICE_HEADER, authproof.format_address(address)),
        (authproof.REQUEST_TIME_HEADER, str(time_ms)),
        (authproof.REQUEST_NONCE_HEADER, nonce),
        (authproof.REQUEST_SIGNATURE_HEADER, signing_key.sign(transcript)),
    )
