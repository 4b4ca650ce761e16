"""TLS to the data stores (Cassandra, Redis): client contexts and readable failures.

:class:`ClientTls` holds one store client's TLS settings together with the config keys
that set them (``cassandra.ssl_ca_file``, ``presence.redis_ca_file``, ...), so every
error can name the key to fix:

- :meth:`ClientTls.context` builds the ``ssl.SSLContext`` (TLS client, server
  certificates verified against the CA file or the system roots, an optional client
  certificate); a file that cannot be read is a ``ConfigError`` naming its key.
- :meth:`ClientTls.explain` turns a failed handshake, buried in a driver exception,
  into one sentence: which certificate did not verify against which CA, or that the
  host name did not match, or that the server wants (or refused) a client
  certificate. Drivers report these as a bare connection error otherwise.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.config import CassandraConfig, ConfigError, PresenceConfig

_VERIFY = re.compile(r"certificate verify failed: (?P<reason>.*)")
_ALERT = re.compile(r"\[SSL: (?P<code>[A-Z0-9_]*ALERT_[A-Z0-9_]+)\] (?P<text>.*)")
#: OpenSSL's source location at the end of its messages, e.g. " (_ssl.c:1006)".
_SOURCE = re.compile(r" \(_ssl\.c:\d+\)\.?")
#: The peer hung up mid-handshake (a TLS 1.3 server refusing the client's certificate,
#: or the lack of one, may close before its alert arrives).
_EOF = ("EOF occurred in violation of protocol", "UNEXPECTED_EOF")
#: The peer reset the connection. With TLS 1.3 a server verifies the client certificate
#: after the client has finished its handshake and sent its first request; refusing it,
#: the server may close with that request unread, so the client sees only a reset.
_RESET = ("Connection reset by peer", "ConnectionResetError")
#: Reasons from most to least specific (the vaguer ones are guesses).
_RANKS = ("the server certificate", "requires a client", "refused the handshake", "")
_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """The TLS settings of one store client and the config keys they come from."""

    ca_file: str
    cert_file: str
    key_file: str
    check_hostname: bool
    #: Config key paths of ``ca_file``, ``cert_file``, ``key_file`` (and of the host
    #: name check, if configurable), for messages.
    ca_key: str
    cert_key: str
    key_key: str
    check_hostname_key: str = ""

    def context(self) -> ssl.SSLContext:
        """A TLS client context; ConfigError naming the key if a file cannot be used."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
        if self.ca_file:
            _readable(self.ca_file, self.ca_key)
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(
                    f"{self.ca_key}: {self.ca_file} holds no PEM CA certificate ({exc})"
                ) from exc
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert_file:
            _readable(self.cert_file, self.cert_key)
            _readable(self.key_file, self.key_key)
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(
                    f"{self.cert_key}, {self.key_key}: {self.cert_file} and {self.key_file} "
                    f"are not a PEM certificate and its private key ({exc})"
                ) from exc
        return context

    @property
    def roots(self) -> str:
        """What verifies the server, for messages."""
        if self.ca_file:
            return f"the CA in {self.ca_file} ({self.ca_key})"
        return f"the system roots ({self.ca_key} is not set)"

    def explain(self, exc: BaseException, where: str) -> str | None:
        """One sentence on why the TLS handshake with ``where`` failed, if it did.

        None when nothing in ``exc`` (its causes and contexts included) is a TLS failure.
        """
        found = [r for r in (self._explain_text(t, where) for t in _messages(exc)) if r]
        return min(found)[1] if found else None

    def _explain_text(self, text: str, where: str) -> tuple[int, str] | None:
        """(rank, reason) for one message: the lowest rank is the most specific."""
        reason = self._reason(text, where)
        if reason is None:
            return None
        rank = next(i for i, prefix in enumerate(_RANKS) if prefix in reason or not prefix)
        return rank, reason

    def _reason(self, text: str, where: str) -> str | None:
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            match = _VERIFY.search(text)
            reason = _SOURCE.sub("", match.group("reason") if match else text)
            if "mismatch" in reason:  # "Hostname mismatch", "IP address mismatch"
                hint = (
                    f"; connect by a name it lists, or set {self.check_hostname_key} = false"
                    if self.check_hostname_key
                    else "; connect by a name it lists"
                )
                return (
                    f"TLS: the server certificate of {where} does not match the host name "
                    f"it was reached by ({reason}){hint}"
                )
            return (
                f"TLS: the server certificate of {where} did not verify against "
                f"{self.roots}: {reason}"
            )
        if "CERTIFICATE_REQUIRED" in text:
            return (
                f"TLS: {where} requires a client certificate: set {self.cert_key} and "
                f"{self.key_key}"
            )
        alert = _ALERT.search(text)
        if alert is not None:
            return self._refused(where, f"refused the handshake ({_SOURCE.sub('', alert['text'])})")
        if any(code in text for code in _EOF):
            return self._refused(where, "closed the connection during the handshake")
        if any(code in text for code in _RESET):
            return self._refused(where, "reset the connection (right after the handshake?)")
        if any(code in text for code in _NOT_TLS):
            return f"TLS: {where} did not answer in TLS (is TLS on at that port?): {text}"
        return None

    def _refused(self, where: str, what: str) -> str:
        if self.cert_file:
            return (
                f"TLS: {where} {what}: does it trust the client certificate "
                f"{self.cert_file} ({self.cert_key})?"
            )
        return (
            f"TLS: {where} {what}: does it require a client certificate? "
            f"(set {self.cert_key} and {self.key_key})"
        )


def _readable(path: str, key: str) -> None:
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def _messages(exc: BaseException) -> Iterator[str]:
    """The messages of ``exc``, its causes and contexts, and a driver's per-host errors."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield str(err)
        errors = getattr(err, "errors", None)  # cassandra NoHostAvailable: host -> error
        if isinstance(errors, dict):
            todo += [e for e in errors.values() if isinstance(e, BaseException)]
        todo += [e for e in (err.__cause__, err.__context__) if e is not None]


def cassandra_tls(config: CassandraConfig) -> ClientTls | None:
    """The TLS settings of ``[cassandra]``; None when TLS is off (no ``ssl_ca_file``)."""
    if not config.ssl_ca_file:
        return None
    return ClientTls(
        ca_file=config.ssl_ca_file,
        cert_file=config.ssl_cert_file,
        key_file=config.ssl_key_file,
        check_hostname=config.ssl_check_hostname,
        ca_key="cassandra.ssl_ca_file",
        cert_key="cassandra.ssl_cert_file",
        key_key="cassandra.ssl_key_file",
        check_hostname_key="cassandra.ssl_check_hostname",
    )


def redis_tls(config: PresenceConfig) -> ClientTls | None:
    """The TLS settings of ``presence.redis_url``; None unless it is ``rediss://``."""
    if not config.redis_url.startswith("rediss://"):
        return None
    return ClientTls(
        ca_file=config.redis_ca_file,
        cert_file=config.redis_cert_file,
        key_file=config.redis_key_file,
        check_hostname=True,
        ca_key="presence.redis_ca_file",
        cert_key="presence.redis_cert_file",
        key_key="presence.redis_key_file",
    )


def redis_where(config: PresenceConfig) -> str:
    """``host:port`` of ``presence.redis_url``, for messages."""
    try:
        parts = urlsplit(config.redis_url)
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
    except ValueError:
        return config.redis_url


def redis_client_kwargs(config: PresenceConfig) -> dict[str, Any]:
    """Keyword arguments for ``redis.asyncio.Redis.from_url(presence.redis_url, ...)``.

    For a ``rediss://`` URL: the CA, client certificate and host name check; the files
    are checked here, so a missing one is a ConfigError naming its key.
    """
    tls = redis_tls(config)
    if tls is None:
        return {}
    tls.context()  # raises ConfigError naming the key of a file that cannot be used
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if tls.ca_file:
        kwargs["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        kwargs["ssl_certfile"] = tls.cert_file
        kwargs["ssl_keyfile"] = tls.key_file
    return kwargs


def describe_redis_error(config: PresenceConfig, exc: BaseException, where: str) -> str:
    """``exc`` of a Redis call at ``where``: the TLS reason, or the error spelled out.

    redis-py reports a failed connection as a bare ``ConnectionError`` whose message
    says little; the real error is in its context.
    """
    tls = redis_tls(config)
    if tls is not None:
        reason = tls.explain(exc, where)
        if reason is not None:
            return reason
    text = f"{exc}"
    inner = exc.__cause__ or exc.__context__
    if inner is not None and str(inner) and str(inner) not in text:
        text += f" ({type(inner).__name__}: {inner})"
    if tls is not None and "Timeout connecting" in text:
        # A plaintext Redis reads a TLS hello as the start of a command and waits.
        text += " (no TLS handshake: is TLS on at that port?)"
    return text
