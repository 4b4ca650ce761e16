"""TLS for every gRPC hop: server credentials that reload, client credentials, node ids.

Servers (relay device port, key directory, node-link listener) take their certificate
from ``[tls]``: ``cert_file`` and ``key_file`` (PEM), and for mutual TLS
``client_ca_file``. The files are read again whenever they change (checked at each new
handshake, at most once a second) or when :func:`reload_all` is called (``relayd``
does on SIGHUP): open streams keep the session they have, new connections get the new
certificate. Clients verify servers with ``ca_file`` (PEM; empty: the system roots).

Plaintext is for loopback only: :func:`check_listen` refuses a non-loopback address
without TLS unless ``tls.allow_plaintext`` says it is deliberate (then it logs a
warning at start).

A relay node's certificate names its node id in a URI SAN, ``urn:e2ee-relay:node:<id>``
(:data:`NODE_URI_PREFIX`); node links accept a peer only if that id is the node it
claims to be.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

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
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class _ReloadingFiles:
    """The PEM files of one server, read again when their modification times change."""

    def __init__(self, tls: TlsConfig, require_client_auth: bool) -> None:
        self._tls = tls
        self._require = require_client_auth
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

    def _load(self) -> grpc.ServerCertificateConfiguration:
        stamp = self._mtimes()
        key = _read(self._tls.key_file, "key_file")
        cert = _read(self._tls.cert_file, "cert_file")
        roots = (
            _read(self._tls.client_ca_file, "client_ca_file") if self._tls.client_ca_file else None
        )
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def force(self) -> None:
        """Read the files again at the next handshake (SIGHUP)."""
        self._forced = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """GRPC's certificate fetcher: a new configuration, or None for 'unchanged'."""
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


_ALL: weakref.WeakSet[_ReloadingFiles] = weakref.WeakSet()


def reload_all() -> None:
    """Make every TLS server of this process read its files again (``relayd`` on SIGHUP)."""
    for files in list(_ALL):
        files.force()


def server_credentials(tls: TlsConfig, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """Server credentials of ``tls`` that read the files again when they change.

    ``require_client_auth``: clients must present a certificate signed by
    ``tls.client_ca_file`` (mutual TLS). The credentials hold the fetcher, which holds
    the files' state, for as long as the server uses them.
    """
    if not tls.cert_file or not tls.key_file:
        raise ConfigError("tls.cert_file and tls.key_file are both needed for TLS")
    if require_client_auth and not tls.client_ca_file:
        raise ConfigError("tls.client_ca_file is needed to verify client certificates")
    files = _ReloadingFiles(tls, require_client_auth)
    _ALL.add(files)
    return grpc.dynamic_ssl_server_credentials(
        files.config,
        files.fetch,  # type: ignore[arg-type]  # None means "unchanged" (grpc docs)
        require_client_authentication=require_client_auth,
    )


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
    use_tls = tls if tls is not None else bool(ca_file) or not is_loopback(target)
    if not use_tls:
        return grpc.aio.insecure_channel(target, options=list(options))
    creds = channel_credentials(ca_file, cert_file=cert_file, key_file=key_file)
    return grpc.aio.secure_channel(target, creds, options=list(options))


def node_id_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The node id in the peer certificate's URI SAN ``urn:e2ee-relay:node:<id>``, if any."""
    for value in auth_context.get("x509_subject_alternative_name", ()):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if text.startswith(NODE_URI_PREFIX):
            return text[len(NODE_URI_PREFIX) :]
    return None
