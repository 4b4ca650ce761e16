"""Bytes that do not parse as the request type get INVALID_ARGUMENT, not UNKNOWN.

gRPC deserializes a request before the servicer runs, and a deserializer that raises
ends the call with UNKNOWN ("Unexpected <class DecodeError>"). :class:`DecodeGuard`, a
server interceptor, wraps every deserializer so that it returns a marker instead, and
every handler so that the marker becomes an INVALID_ARGUMENT status naming the method:
for unary calls before the servicer runs, for streams at the frame that does not parse
(through ``context.read()`` or the request iterator). Responses are untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from relay.common.status import abort
from relay.errors import InvalidArgument


class _Undecodable:
    """What a guarded deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError and friends: whatever the parser raises
            return _Undecodable(f"{type(exc).__name__}: {exc}"[:200])

    return deserialize


def _error(method: str, marker: _Undecodable) -> InvalidArgument:
    return InvalidArgument(
        f"the request to {method} does not parse as its protobuf type ({marker.error})"
    )


class _Context:
    """A servicer context whose ``read()`` refuses a frame that did not parse."""

    def __init__(self, context: Any, method: str) -> None:
        self._context = context
        self._method = method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        """The next request frame; INVALID_ARGUMENT ends the call if it does not parse."""
        message = await self._context.read()
        if isinstance(message, _Undecodable):
            await abort(self._context, _error(self._method, message))
        return message


async def _guarded(requests: Any, context: Any, method: str) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, _Undecodable):
            await abort(context, _error(method, message))
        yield message


class DecodeGuard(grpc.aio.ServerInterceptor):
    """The interceptor (see the module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler of the call, with its deserializer and behaviour guarded."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        safe = _safe(handler.request_deserializer)
        out = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method), safe, out
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary(handler.unary_stream, method), safe, out
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _stream(handler.stream_unary, method), safe, out
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _stream(handler.stream_stream, method), safe, out
            )
        return handler


def _unary(inner: Any, method: str) -> Any:
    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await abort(context, _error(method, request))
            async for response in inner(request, context):
                yield response

        return stream

    async def call(request: Any, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            await abort(context, _error(method, request))
        return await inner(request, context)

    return call


def _stream(inner: Any, method: str) -> Any:
    if inspect.isasyncgenfunction(inner):

        async def stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            wrapped = _Context(context, method)
            async for response in inner(_guarded(requests, context, method), wrapped):
                yield response

        return stream

    async def call(requests: Any, context: Any) -> Any:
        return await inner(_guarded(requests, context, method), _Context(context, method))

    return call
