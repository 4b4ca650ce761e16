"""Translate gRPC failures and per-envelope send results into the relay.errors tree."""

from __future__ import annotations

import grpc

from relay.common.status import error_info
from relay.errors import (
    AlreadyExists,
    DeviceRemoved,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RelayError,
    SessionDisplaced,
    Status,
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


def from_rpc_error(exc: grpc.aio.AioRpcError, *, target: str = "") -> RelayError:
    """The relay.errors exception for a failed call; ``target`` names the server in it."""
    code = exc.code()
    message = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE and target:
        message = f"{target} is unreachable: {message}"
    info = error_info(exc)
    return error_for(
        int(code.value[0]),
        message,
        reason=info.reason if info is not None else "",
        metadata=dict(info.metadata) if info is not None else None,
    )


def is_retryable(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a Connect stream that ended with ``exc`` should be reconnected.

    Connection loss (including a stream the transport cut: INTERNAL without an ErrorInfo
    from the relay), overload and aborted sessions are retried; a displaced session
    (ABORTED with reason SESSION_DISPLACED), a removed device (PERMISSION_DENIED with
    reason DEVICE_REMOVED) and every client error are not.
    """
    info = error_info(exc)
    if exc.code() == grpc.StatusCode.INTERNAL:
        # Without an ErrorInfo from the relay this is the transport's own verdict on a
        # stream cut mid-flight ("Internal error from Core", RST_STREAM): a node that
        # died. Reconnect (to the next node). An INTERNAL the relay sent is not retried.
        return info is None
    if exc.code() not in _RETRYABLE:
        return False
    return info is None or info.reason not in (SessionDisplaced.reason, DeviceRemoved.reason)
