"""Channels to the relay and the key directory: TLS unless the server is on plain loopback.

``tls_ca`` is the PEM file of the CA that signed the server's certificate (``relayd
dev-certs`` makes one: ``ca.pem``); empty means the system's trusted CAs. ``tls``
None decides by itself: TLS with a ``tls_ca`` or for any non-loopback target,
plaintext for a loopback target without one (``make run``). True or False forces it.
"""

from __future__ import annotations

import grpc

from relay.common.tls import secure_or_plain_channel, uses_tls
from relay.sdk.session import CHANNEL_OPTIONS
from relay.sdk.status import Endpoint


def endpoint(name: str, target: str, *, tls_ca: str = "", tls: bool | None = None) -> Endpoint:
    """How :func:`open_channel` reaches ``target`` (what error messages say about it)."""
    return Endpoint(name, target, uses_tls(target, ca_file=tls_ca, tls=tls), tls_ca)


def open_channel(target: str, *, tls_ca: str = "", tls: bool | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` (``host:port``) with the SDK's options; the caller closes it."""
    return secure_or_plain_channel(target, ca_file=tls_ca, tls=tls, options=CHANNEL_OPTIONS)
