"""Unit tests: reconnect backoff and the mapping of statuses to relay.errors."""

from __future__ import annotations

from typing import Any

import grpc

from relay.common.status import to_rpc_status
from relay.errors import (
    LimitExceeded,
    NotFound,
    RelayError,
    SessionDisplaced,
    Status,
    Unauthenticated,
    Unavailable,
)
from relay.sdk.backoff import ExponentialBackoff
from relay.sdk.status import displaced_by_newer, error_for, is_retryable


async def test_backoff_is_exponential_with_full_jitter_and_a_cap() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    top = ExponentialBackoff(base=0.5, cap=3.0, sleep=sleep, rand=lambda: 1.0)
    for attempt in range(1, 6):
        assert await top(attempt)
    assert slept == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert ExponentialBackoff(base=0.5, rand=lambda: 0.25).delay(3) == 0.5
    assert ExponentialBackoff(rand=lambda: 1.0).delay(10_000) == 30.0


async def test_backoff_gives_up_after_max_attempts() -> None:
    async def sleep(seconds: float) -> None:
        pass

    backoff = ExponentialBackoff(max_attempts=2, sleep=sleep)
    assert [await backoff(n) for n in (1, 2, 3)] == [True, True, False]


def test_statuses_map_to_the_error_tree() -> None:
    limit = error_for(
        Status.RESOURCE_EXHAUSTED,
        "too big",
        metadata={"limit": "max_envelope_bytes", "value": "64"},
    )
    assert isinstance(limit, LimitExceeded)
    assert (limit.limit, limit.value, limit.message) == ("max_envelope_bytes", 64, "too big")
    no_value = error_for(Status.RESOURCE_EXHAUSTED, "full", metadata={"limit": "max_queue_depth"})
    assert isinstance(no_value, LimitExceeded) and no_value.limit == "max_queue_depth"
    displaced = error_for(Status.ABORTED, "newer session", reason="SESSION_DISPLACED")
    assert isinstance(displaced, SessionDisplaced)
    assert isinstance(error_for(Status.UNAUTHENTICATED, "bad"), Unauthenticated)
    assert isinstance(error_for(Status.NOT_FOUND, "gone"), NotFound)
    assert isinstance(error_for(Status.UNAVAILABLE, "down"), Unavailable)
    other = error_for(Status.ABORTED, "conflict")
    assert type(other) is RelayError and other.status is Status.ABORTED
    assert error_for(99, "odd").status is Status.UNKNOWN


def _rpc_error(code: grpc.StatusCode, details: str, error: RelayError | None = None) -> Any:
    trailing = grpc.aio.Metadata()
    if error is not None:
        status = to_rpc_status(error)
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def test_which_stream_endings_reconnect() -> None:
    # A node killed mid-stream can surface as INTERNAL from the transport: fail over.
    assert is_retryable(_rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    assert is_retryable(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    # An INTERNAL the relay itself sent (with its ErrorInfo) is not retried.
    relay_internal = RelayError("bug")
    assert not is_retryable(_rpc_error(grpc.StatusCode.INTERNAL, "bug", relay_internal))
    assert not is_retryable(_rpc_error(grpc.StatusCode.UNAUTHENTICATED, "bad signature"))


def test_a_displacement_is_final_only_for_a_newer_session() -> None:
    newer = SessionDisplaced("newer session", metadata={"session_epoch": "101"})
    ended = _rpc_error(grpc.StatusCode.ABORTED, "newer session", newer)
    assert displaced_by_newer(ended, 100)
    assert not is_retryable(ended, session_epoch=100)
    # The same epoch, an older one, or a session that never got Ready: not proof.
    assert is_retryable(ended, session_epoch=101)
    assert is_retryable(ended, session_epoch=500)
    assert is_retryable(ended)
    # No epoch at all (or not a number), or no ErrorInfo: retried.
    bare = _rpc_error(grpc.StatusCode.ABORTED, "x", SessionDisplaced("x"))
    assert is_retryable(bare, session_epoch=1)
    odd = SessionDisplaced("x", metadata={"session_epoch": "-5"})
    assert is_retryable(_rpc_error(grpc.StatusCode.ABORTED, "x", odd), session_epoch=1)
    assert not displaced_by_newer(_rpc_error(grpc.StatusCode.ABORTED, "no info"), 1)
