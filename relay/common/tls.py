"""TLS for every gRPC hop: server credentials that reload, client credentials, node ids.

Servers (relay device port, key directory, node-link listener) take their certificate
from ``[tls]``: ``cert_file`` and ``key_file`` (PEM), and for mutual TLS
``client_ca_file``. The files are read again whenever they change (checked at each new
handshake, at most once a second) or when :func:`reload_all` is called (``relayd``
does on SIGHUP): open streams keep the session they have, new connections get the new
certificate. Clients verify servers with ``ca_file`` (PEM; empty: the system roots).

The metrics endpoint (HTTP, not gRPC) follows the same files through
:func:`follow_files`. Clients learn whether a call uses TLS from :func:`uses_tls`.

Plaintext is for loopback only: :func:`check_listen` refuses a non-loopback address
without TLS unless ``tls.allow_plaintext`` says it is deliberate (then it logs a
warning at start). Bearer keys (tenant API keys, the relay nodes' key) are accepted
only on a call :func:`call_is_protected` approves: over TLS, or from this machine.

A relay node's certificate names its node id in a URI SAN, ``urn:e2ee-relay:node:<id>``
(:data:`NODE_URI_PREFIX`); node links accept a peer only if that id is the node it
claims to be.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from relay.config import ConfigError, TlsConfig

log = logging.getLogger(__name__)

NODE_URI_PREFIX = "urn:e2ee-relay:node:"
#: A changed certificate file is noticed at most this long after the change.
RECHECK_SECONDS = 1.0
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def host_of(address: str) -> str:
    """The host part of ``host:port`` (brackets of an IPv6 literal removed)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host_of(address)
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def check_listen(name: str, listen: str, tls: TlsConfig) -> bool:
    """Decide whether listener ``name`` on ``listen`` uses TLS; refuse unsafe plaintext.

    Returns True for TLS. A non-loopback address (``0.0.0.0`` included) without TLS
    is a ConfigError unless ``tls.allow_plaintext``, which logs a warning instead.
    """
    if tls.enabled:
        return True
    if is_loopback(listen):
        return False
    if not tls.allow_plaintext:
        raise ConfigError(
            f"{name} {listen!r} is not a loopback address and [tls] has no cert_file/key_file: "
            "configure TLS (see `relayd dev-certs`), or set tls.allow_plaintext = true if "
            "plaintext on this network is deliberate"
        )
    log.warning(
        "%s listens on %s WITHOUT TLS (tls.allow_plaintext = true): anyone on the network "
        "can read and change its traffic",
        name,
        listen,
    )
    return False


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{what}: {exc}") from exc


T = TypeVar("T")
#: Turns (key, certificate chain, client CA or None), all PEM, into what a server uses.
Build = Callable[[bytes, bytes, bytes | None], T]


class _ReloadingFiles(Generic[T]):
    """The PEM files of one server, read again when their modification times change."""

    def __init__(self, tls: TlsConfig, build: Build[T]) -> None:
        self._tls = tls
        self._build = build
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._checked = 0.0
        self._forced = False
        self.config = self._load()

    def _paths(self) -> list[str]:
        paths = [self._tls.cert_file, self._tls.key_file]
        if self._tls.client_ca_file:
            paths.append(self._tls.client_ca_file)
        return paths

    def _mtimes(self) -> tuple[float, ...]:
        out = []
        for path in self._paths():
            try:
                out.append(os.stat(path).st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def _load(self) -> T:
        stamp = self._mtimes()
        key = _read(self._tls.key_file, "key_file")
        cert = _read(self._tls.cert_file, "cert_file")
        roots = (
            _read(self._tls.client_ca_file, "client_ca_file") if self._tls.client_ca_file else None
        )
        config = self._build(key, cert, roots)
        self._stamp = stamp
        return config

    def force(self) -> None:
        """Read the files again at the next handshake (SIGHUP)."""
        self._forced = True

    def fetch(self) -> T | None:
        """The new configuration if the files changed (or :meth:`force`), else None."""
        now = time.monotonic()
        with self._lock:
            if not self._forced and now - self._checked < RECHECK_SECONDS:
                return None
            self._checked = now
            forced, self._forced = self._forced, False
            if not forced and self._mtimes() == self._stamp:
                return None
            try:
                self.config = self._load()
            except ConfigError as exc:  # a half-written file: keep serving the old one
                log.warning("TLS files changed but could not be read (%s); keeping the old", exc)
                return None
            log.info("TLS certificate reloaded from %s", self._tls.cert_file)
            return self.config


_ALL: weakref.WeakSet[_ReloadingFiles[Any]] = weakref.WeakSet()


def reload_all() -> None:
    """Make every TLS server of this process read its files again (``relayd`` on SIGHUP)."""
    for files in list(_ALL):
        files.force()


def _grpc_config(
    key: bytes, cert: bytes, roots: bytes | None
) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)


def server_credentials(tls: TlsConfig, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """Server credentials of ``tls`` that read the files again when they change.

    ``require_client_auth``: clients must present a certificate signed by
    ``tls.client_ca_file`` (mutual TLS). The credentials hold the fetcher, which holds
    the files' state, for as long as the server uses them.
    """
    _check_server_files(tls)
    if require_client_auth and not tls.client_ca_file:
        raise ConfigError("tls.client_ca_file is needed to verify client certificates")
    files = _ReloadingFiles(tls, _grpc_config)
    _ALL.add(files)
    return grpc.dynamic_ssl_server_credentials(
        files.config,
        files.fetch,  # type: ignore[arg-type]  # None means "unchanged" (grpc docs)
        require_client_authentication=require_client_auth,
    )


def _check_server_files(tls: TlsConfig) -> None:
    if not tls.cert_file or not tls.key_file:
        raise ConfigError("tls.cert_file and tls.key_file are both needed for TLS")


def _ssl_context(tls: TlsConfig) -> Build[ssl.SSLContext]:
    def build(key: bytes, cert: bytes, roots: bytes | None) -> ssl.SSLContext:
        # The ssl module reads a certificate chain from files only. Should they change
        # again in between, it reads the newer ones (or fails, and the old stay).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.cert_file/key_file: {exc}") from exc
        return context

    return build


def follow_files(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Make the server-side ``context`` serve the current files of ``tls`` at each handshake.

    For the servers that are not gRPC (the metrics endpoint): ``context`` gets an SNI
    callback that swaps in a context with the new certificate when the files changed
    (or after :func:`reload_all`); connections already open keep theirs.
    """
    _check_server_files(tls)
    files = _ReloadingFiles(tls, _ssl_context(tls))
    _ALL.add(files)

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any) -> None:
        files.fetch()
        sock.context = files.config

    context.sni_callback = pick


def channel_credentials(
    ca_file: str = "", *, cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials:
    """Client credentials: verify servers with ``ca_file`` (system roots if empty).

    ``cert_file``/``key_file`` present a client certificate (mutual TLS, node links).
    """
    roots = _read(ca_file, "ca_file") if ca_file else None
    if bool(cert_file) != bool(key_file):
        raise ConfigError("a client certificate needs both tls.cert_file and tls.key_file")
    key = _read(key_file, "key_file") if key_file else None
    cert = _read(cert_file, "cert_file") if cert_file else None
    return grpc.ssl_channel_credentials(roots, key, cert)


def uses_tls(target: str, *, ca_file: str = "", tls: bool | None = None) -> bool:
    """Whether :func:`secure_or_plain_channel` connects to ``target`` over TLS."""
    return tls if tls is not None else bool(ca_file) or not is_loopback(target)


def secure_or_plain_channel(
    target: str,
    *,
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    tls: bool | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """A channel to ``target``, over TLS unless told otherwise or on plain loopback.

    ``tls`` None decides by itself: TLS with a ``ca_file`` or for any non-loopback
    target (the system roots verify it then); plaintext for loopback without a CA.
    """
    if not uses_tls(target, ca_file=ca_file, tls=tls):
        return grpc.aio.insecure_channel(target, options=list(options))
    creds = channel_credentials(ca_file, cert_file=cert_file, key_file=key_file)
    return grpc.aio.secure_channel(target, creds, options=list(options))


def peer_is_local(peer: str) -> bool:
    """Whether a gRPC peer is this machine.

    ``peer`` is as ``context.peer()`` gives it: ``ipv4:127.0.0.1:5``,
    ``ipv6:%5B::1%5D:5`` or ``unix:...`` (a Unix socket is local).
    """
    kind, _, address = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    return is_loopback(urllib.parse.unquote(address))


#: Why a bearer key (a tenant API key, the relay nodes' key) sent in the clear is refused.
BEARER_NEEDS_TLS = (
    "API keys only over TLS or loopback: this call came in plaintext from another host "
    "(serve TLS, see [tls], and connect over it)"
)


def call_is_protected(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether a call came over TLS or from this machine: where a bearer key may travel."""
    security = context.auth_context().get("transport_security_type", ())
    return b"ssl" in security or peer_is_local(context.peer())


def node_id_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The node id in the peer certificate's URI SAN ``urn:e2ee-relay:node:<id>``, if any."""
    for value in auth_context.get("x509_subject_alternative_name", ()):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if text.startswith(NODE_URI_PREFIX):
            return text[len(NODE_URI_PREFIX) :]
    return None
