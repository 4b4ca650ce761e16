"""Translate gRPC failures and per-envelope send results into the relay.errors tree."""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from relay.common.status import error_info
from relay.errors import (
    AlreadyExists,
    DeviceRemoved,
    Draining,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RelayError,
    SessionDisplaced,
    Status,
    TlsFailure,
    Unauthenticated,
    Unavailable,
)

_BY_STATUS: dict[Status, type[RelayError]] = {
    Status.INVALID_ARGUMENT: InvalidArgument,
    Status.UNAUTHENTICATED: Unauthenticated,
    Status.PERMISSION_DENIED: PermissionDenied,
    Status.NOT_FOUND: NotFound,
    Status.ALREADY_EXISTS: AlreadyExists,
    Status.FAILED_PRECONDITION: FailedPrecondition,
    Status.UNAVAILABLE: Unavailable,
}

#: Call failures after which a new Connect attempt may succeed.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


def error_for(
    code: int, message: str, *, reason: str = "", metadata: dict[str, str] | None = None
) -> RelayError:
    """The relay.errors exception for a status ``code`` (and ErrorInfo reason/metadata)."""
    meta = dict(metadata or {})
    if reason == SessionDisplaced.reason:
        return SessionDisplaced(message, metadata=meta)
    if reason == DeviceRemoved.reason:
        return DeviceRemoved(message, metadata=meta)
    if reason == Draining.reason:
        return Draining(message, metadata=meta)
    try:
        status = Status(code)
    except ValueError:
        status = Status.UNKNOWN
    if status is Status.RESOURCE_EXHAUSTED:
        value = meta.get("value", "0")
        return LimitExceeded(
            meta.get("limit", "unknown"), int(value) if value.isdigit() else 0, message
        )
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message, metadata=meta)
    error = RelayError(message, metadata=meta)
    error.status = status
    error.reason = reason or status.name
    return error


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server as a client reaches it, for error messages that say where and how.

    ``tls`` None: not known (a channel the caller made). ``ca_file``: the CA the client
    verifies the server with; empty: the system's trusted roots.
    """

    name: str
    address: str = ""
    tls: bool | None = None
    ca_file: str = ""

    def __str__(self) -> str:
        return f"{self.name} {self.address}" if self.address else self.name


#: What gRPC (BoringSSL) says when a host name is not in the server's certificate.
_WRONG_HOST = re.compile(
    r"Hostname Verification Check failed|not in peer certificate|No match found for server name"
)
#: ... when the chain does not verify (unknown CA, expired, bad signature).
_UNVERIFIED = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|certificate signature failure|"
    r"unable to get (local )?issuer certificate|self.signed certificate|certificate has expired|"
    r"certificate is not yet valid|BAD_SIGNATURE"
)
#: ... when the server answered a TLS hello in plaintext.
_NOT_TLS = re.compile(r"WRONG_VERSION_NUMBER|HTTP_REQUEST|wrong version number")


def _ssl_reason(details: str) -> str:
    """The OpenSSL part of a handshake failure: ``BAD_SIGNATURE: certificate signature failure``."""
    reason = details.rsplit("OPENSSL_internal:", 1)[-1] if "OPENSSL_internal:" in details else ""
    return reason.removesuffix(": OK").strip()


def tls_failure(details: str, target: Endpoint) -> TlsFailure | None:
    """The TlsFailure that a failed connection's ``details`` describe, if they are TLS's.

    Says which certificate did not verify against which CA, or which host name it does
    not name, or that the server does not speak TLS.
    """
    roots = f"the CA in {target.ca_file}" if target.ca_file else "the system's trusted CAs"
    reason = _ssl_reason(details)
    why = f" ({reason})" if reason else ""
    if _WRONG_HOST.search(details):
        host = target.address.rsplit(":", 1)[0].strip("[]") if target.address else "asked for"
        return TlsFailure(
            f"the TLS certificate of {target} does not name the host {host}: connect by a "
            "name the certificate lists (its subject alternative names), or issue one for it"
        )
    if _UNVERIFIED.search(details):
        return TlsFailure(
            f"the TLS certificate of {target} did not verify against {roots}{why}: "
            "is it signed by another CA, or expired?"
        )
    if _NOT_TLS.search(details):
        return TlsFailure(f"{target} does not speak TLS{why}: it serves plaintext")
    connecting = "failed to connect" in details  # not a stream cut after it began
    if target.tls is False and connecting and "Socket closed" in details:
        return TlsFailure(
            f"{target} closed the plaintext connection at once: if it serves TLS, "
            "connect over TLS with the CA that signed its certificate"
        )
    return None


def from_rpc_error(exc: grpc.aio.AioRpcError, *, target: str | Endpoint = "") -> RelayError:
    """The relay.errors exception for a failed call; ``target`` names the server in it.

    A connection that failed in its TLS handshake is a :class:`TlsFailure` saying why.
    """
    code = exc.code()
    message = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        endpoint = target if isinstance(target, Endpoint) else Endpoint(target)
        failure = tls_failure(message, endpoint)
        if failure is not None:
            return failure
        if target:
            message = f"{target} is unreachable: {message}"
    info = error_info(exc)
    return error_for(
        int(code.value[0]),
        message,
        reason=info.reason if info is not None else "",
        metadata=dict(info.metadata) if info is not None else None,
    )


def displaced_by_newer(exc: grpc.aio.AioRpcError, session_epoch: int | None) -> bool:
    """Whether ``exc`` is the relay saying a newer session of this device took over.

    That is ABORTED with reason SESSION_DISPLACED whose ``session_epoch`` (the epoch of
    the session that took over) is above ``session_epoch``, the epoch of the session
    that ended (its ``Ready.session_epoch``; None if it never got Ready). Anything else
    (no epoch, not a newer one, no Ready) is not proof of a newer session.
    """
    info = error_info(exc)
    if (
        exc.code() != grpc.StatusCode.ABORTED
        or info is None
        or info.reason != SessionDisplaced.reason
        or session_epoch is None
    ):
        return False
    newer = info.metadata.get("session_epoch", "")
    return newer.isdigit() and int(newer) > session_epoch


def is_retryable(exc: grpc.aio.AioRpcError, *, session_epoch: int | None = None) -> bool:
    """Whether a Connect stream that ended with ``exc`` should be reconnected.

    Connection loss (including a stream the transport cut: INTERNAL without an ErrorInfo
    from the relay), overload and aborted sessions are retried; a removed device
    (PERMISSION_DENIED with reason DEVICE_REMOVED) and every client error are not. A
    displacement (ABORTED with reason SESSION_DISPLACED) is final only when the relay
    names a newer session of the device than ``session_epoch``, the ended session's
    own (see :func:`displaced_by_newer`); otherwise it is retried with backoff, so that
    a displacement nobody can vouch for never takes the device offline for good.
    """
    info = error_info(exc)
    if exc.code() == grpc.StatusCode.INTERNAL:
        # Without an ErrorInfo from the relay this is the transport's own verdict on a
        # stream cut mid-flight ("Internal error from Core", RST_STREAM): a node that
        # died. Reconnect (to the next node). An INTERNAL the relay sent is not retried.
        return info is None
    if exc.code() not in _RETRYABLE:
        return False
    if info is not None and info.reason == DeviceRemoved.reason:
        return False
    return not displaced_by_newer(exc, session_epoch)
