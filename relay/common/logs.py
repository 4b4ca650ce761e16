"""Process logging: text or JSON lines, each carrying the request id of the RPC it serves.

Every gRPC call a server of this package handles (relay device streams and sends,
node links, the key directory) gets a request id: the client's ``x-request-id``
metadata value when it is short and plain (:data:`REQUEST_ID_PATTERN`), else a new
random one. :class:`RequestIds`, a server interceptor, puts it in a context variable
for the call's task (and the tasks it starts), and :class:`RequestIdFilter` adds it to
every log record as ``request_id`` (``-`` outside a call). The same interceptor ends a
call quietly when what it raised only says that the client went away mid-stream (a
write to a cancelled stream): gRPC would log that as an ERROR traceback.

Log lines never carry secrets, keys or ciphertext: callers log addresses, ids, counts
and error messages only. The request id is the caller's own value or random, so it
is safe to log too.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

#: The request id of the call being served (``-``: none).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: Metadata key a client may set to choose the request id.
REQUEST_ID_METADATA = "x-request-id"
#: A client-chosen request id is used only if it matches (1-64 plain characters).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
#: Fields of a JSON log line, in order (plus ``exc_info`` when there is a traceback).
JSON_FIELDS = ("asctime", "levelname", "name", "request_id", "message")


def outside_calls() -> contextvars.Context:
    """A context for a long-lived task started while serving a call.

    Such a task (a node link, say) outlives the call: its log lines must not carry the
    call's request id. ``asyncio.create_task(coro, context=outside_calls())``.
    """
    context = contextvars.copy_context()
    context.run(REQUEST_ID.set, "-")
    return context


def new_request_id() -> str:
    """A fresh random request id (16 hex digits)."""
    return secrets.token_hex(8)


def request_id_from(metadata: Any) -> str:
    """The client's ``x-request-id`` from call ``metadata`` if acceptable, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            if REQUEST_ID_PATTERN.fullmatch(value):
                return value
            break
    return new_request_id()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current call's, or ``-``) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Set ``record.request_id``; never drops a record."""
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def configure(level: str | int = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level`` as ``fmt`` (``text`` or ``json`` lines), with request ids.

    Replaces the root logger's handlers (a process configures logging once).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is unknown (known: {', '.join(LOG_FORMATS)})")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter  # noqa: PLC0415 - only when used

        handler.setFormatter(
            JsonFormatter(
                list(JSON_FIELDS),
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class RequestIds(grpc.aio.ServerInterceptor):
    """Serve each call with its request id in :data:`REQUEST_ID` (see the module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The call's handler, run with its request id set."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        rid = request_id_from(handler_call_details.invocation_metadata)
        ins, out = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_with_id(handler.unary_unary, rid), ins, out)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _with_id(handler.unary_stream, rid), ins, out
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _with_id(handler.stream_unary, rid), ins, out
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _with_id(handler.stream_stream, rid), ins, out
            )
        return handler


def _client_went_away(context: Any, exc: Exception) -> bool:
    """Whether ``exc`` only says that the client cancelled or dropped the call.

    A write to a stream whose client has gone raises from gRPC's core (ExecuteBatchError
    and the like); gRPC would log that as an ERROR with a traceback, though nothing
    failed on the server's side.
    """
    try:
        gone = bool(context.cancelled())
    except Exception:  # a context that cannot say: not ours to judge
        return False
    if gone:
        log.debug("client went away mid-call (%s); call ended", type(exc).__name__)
    return gone


def _with_id(inner: Any, rid: str) -> Any:
    """``inner`` (a coroutine or async generator function) run with REQUEST_ID = ``rid``.

    An exception raised because the client went away ends the call quietly (DEBUG).
    """
    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            REQUEST_ID.set(rid)  # the call's own task: no reset needed
            try:
                async for response in inner(request, context):
                    yield response
            except Exception as exc:
                if not _client_went_away(context, exc):
                    raise

        return stream
    if not inspect.iscoroutinefunction(inner):
        return inner  # a synchronous handler runs in a thread: left as it is

    async def call(request: Any, context: Any) -> Any:
        REQUEST_ID.set(rid)
        try:
            return await inner(request, context)
        except Exception as exc:
            if not _client_went_away(context, exc):
                raise
            return None

    return call
