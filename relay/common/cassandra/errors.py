"""Driver errors, translated at the adapter seam into the relay's one error tree.

Every failure that means "Cassandra cannot answer now" (no host, unavailable replicas,
read or write timeouts, client-side timeouts, lost connections, overload) becomes
``relay.errors.Unavailable`` naming the operation: callers answer UNAVAILABLE and
never acknowledge a write that is not durable. A statement Cassandra rejects (wrong
schema, bad query) becomes a plain ``RelayError`` that points at ``relayd migrate``.
"""

from __future__ import annotations

import cassandra
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionException
from cassandra.protocol import ErrorMessage

from relay.errors import RelayError, Unavailable

#: Driver exceptions that mean an outage (the rest are bugs or schema mismatches).
OUTAGES: tuple[type[BaseException], ...] = (
    NoHostAvailable,
    cassandra.Unavailable,
    cassandra.Timeout,  # ReadTimeout, WriteTimeout (including CAS contention)
    cassandra.CoordinationFailure,  # ReadFailure, WriteFailure
    cassandra.DriverException,  # OperationTimedOut, ConnectionException, ...
    ConnectionException,
    ErrorMessage,  # Overloaded, IsBootstrapping, ServerError, ...
    OSError,
)


def translate(exc: BaseException, op: str) -> RelayError:
    """The relay error for a driver exception raised during ``op``."""
    if isinstance(exc, cassandra.RequestValidationException):
        return RelayError(
            f"cassandra rejected {op}: {exc} (is the schema migrated? run `relayd migrate`)"
        )
    return Unavailable(f"cassandra is unavailable for {op}: {type(exc).__name__}: {exc}")


def is_contention(exc: BaseException) -> bool:
    """Whether ``exc`` is a lightweight transaction that timed out under contention.

    Its outcome is unknown: it may still be applied. Callers re-read and retry.
    """
    cause = exc.__cause__ if isinstance(exc, Unavailable) else exc
    return isinstance(cause, cassandra.WriteTimeout) and cause.write_type in (
        cassandra.WriteType.CAS,
        "CAS",
    )
