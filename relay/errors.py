"""One error tree for the relay and the key directory.

::

    RelayError
    ├── ClientError                 the caller must change something; carries a Status
    │   ├── InvalidArgument         INVALID_ARGUMENT
    │   ├── Unauthenticated         UNAUTHENTICATED
    │   ├── PermissionDenied        PERMISSION_DENIED
    │   │   └── DeviceRemoved       the device left its user's device list: do not reconnect
    │   ├── NotFound                NOT_FOUND
    │   ├── AlreadyExists           ALREADY_EXISTS
    │   ├── FailedPrecondition      FAILED_PRECONDITION
    │   ├── LimitExceeded           RESOURCE_EXHAUSTED, names the limit and its value
    │   ├── SessionDisplaced        ABORTED: a newer session of the same device took over
    │   └── Draining                UNAVAILABLE: this node is shutting down; reconnect
    │                               to another node at once
    └── Unavailable                 UNAVAILABLE: a backend is down; retryable
        └── TlsFailure              no TLS session: a certificate did not verify, or one
                                    side spoke plaintext (client side only)

Driver errors are translated at the adapter seam (``raise Unavailable(...) from exc``).
Servicers map ``error.status`` to a gRPC status code; nothing here imports grpc.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """The gRPC status codes the relay uses, by their canonical numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class RelayError(Exception):
    """Root of every error the relay raises on purpose."""

    status: Status = Status.INTERNAL
    #: A stable machine-readable reason (google.rpc.ErrorInfo.reason).
    reason: str = "INTERNAL"
    #: Whether the same call may succeed if retried unchanged.
    retryable: bool = False

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class ClientError(RelayError):
    """The caller sent something the relay will not accept as it is."""

    status = Status.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class InvalidArgument(ClientError):
    """A field is malformed or out of range; the message names it."""


class Unauthenticated(ClientError):
    """Missing, forged, replayed or expired credentials."""

    status = Status.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ClientError):
    """Authenticated, but not allowed to do this."""

    status = Status.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class DeviceRemoved(PermissionDenied):
    """The device was removed from its user's device list; its sessions end. Do not reconnect.

    Final: the device's address is never registered again (the key directory never
    gives its number out twice), so retrying cannot succeed.
    """

    reason = "DEVICE_REMOVED"


class NotFound(ClientError):
    """The named device, user or key does not exist."""

    status = Status.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(ClientError):
    """The thing to create exists already."""

    status = Status.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ClientError):
    """The system is not in the state the call needs (e.g. a stale device list)."""

    status = Status.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class LimitExceeded(ClientError):
    """A configured limit was hit. ``limit`` is its configuration name."""

    status = Status.RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"

    def __init__(self, limit: str, value: int, message: str) -> None:
        super().__init__(message, metadata={"limit": limit, "value": str(value)})
        self.limit = limit
        self.value = value


class WriteStalled(ClientError):
    """The device stopped reading its stream: the session ended. Reconnect to resume."""

    status = Status.DEADLINE_EXCEEDED
    reason = "WRITE_STALLED"


class SessionDisplaced(ClientError):
    """A newer receiving session of the same device replaced this one. Do not reconnect.

    ``metadata["session_epoch"]`` is the epoch of the session that took over; a client
    believes the displacement (and stays away) only if it is above its own session's.
    """

    status = Status.ABORTED
    reason = "SESSION_DISPLACED"


class Draining(ClientError):
    """This relay node is shutting down (SIGTERM): reconnect to another node at once.

    Sessions on a draining node end with it, and new sessions are refused with it. It
    is retryable without backoff, elsewhere: the SDK moves to its next target and skips
    this one for a while (``metadata["node_id"]`` names the node).
    """

    status = Status.UNAVAILABLE
    reason = "NODE_DRAINING"
    retryable = True


class Unavailable(RelayError):
    """A backend (store, key directory) is unreachable. Retry with backoff."""

    status = Status.UNAVAILABLE
    reason = "UNAVAILABLE"
    retryable = True


class TlsFailure(Unavailable):
    """No TLS session with a server (raised on the client side).

    The server's certificate did not verify against the CA the client trusts, does not
    name the host the client asked for, or one side spoke plaintext; the message names
    the server and the CA file. Retrying helps only once a certificate or a setting
    changed (a rotation in progress).
    """

    reason = "TLS_HANDSHAKE_FAILED"
