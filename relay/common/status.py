"""Translate the error tree into rich gRPC statuses (google.rpc.Status + ErrorInfo)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from relay.errors import RelayError

ERROR_DOMAIN = "e2ee-relay"

Resp = TypeVar("Resp")


def to_rpc_status(error: RelayError) -> status_pb2.Status:
    """google.rpc.Status for ``error``, with an ErrorInfo detail (reason, metadata)."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(
        code=getattr(code_pb2, error.status.name), message=error.message, details=[detail]
    )


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: RelayError) -> NoReturn:
    """End the call with ``error`` as a rich status."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if the server sent one (client side)."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def unary(fn: F) -> F:
    """Decorate a unary servicer method so that a RelayError becomes its rich status."""

    @functools.wraps(fn)
    async def handler(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except RelayError as exc:
            await abort(context, exc)

    return cast(F, handler)
