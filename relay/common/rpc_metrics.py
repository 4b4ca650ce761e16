"""Per-RPC Prometheus metrics of a grpc.aio server: calls by method and status code, latency.

The names are those of go-grpc-prometheus (``grpc_server_started_total``,
``grpc_server_handled_total``, ``grpc_server_handling_seconds``), so dashboards and alerts
written for other gRPC servers read them. Labels are bounded: ``grpc_service`` and
``grpc_method`` come from the services registered on the server (a call to a method the
server does not have is not counted), ``grpc_code`` from ``grpc.StatusCode``.

A streaming RPC is counted when it ends, with its whole lifetime as its latency: a
``Connect`` stream lasts as long as the device stays online, so its histogram tells how
long sessions last, not how fast the server answers.

Why not a library: py-grpc-prometheus has no grpc.aio interceptor, and its asyncio fork
(py-async-grpc-prometheus, one release) looks up label children for every streamed message.
Here the children of a method are bound once, on its first call.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

#: Latency buckets in seconds: unary calls take milliseconds, streams minutes to hours.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    60.0, 600.0, 3600.0,
)  # fmt: skip
_LABELS = ("grpc_service", "grpc_method", "grpc_type")


class _Method:
    """The pre-bound children of one method's series."""

    __slots__ = ("_handled", "_labels", "_metrics", "seconds", "started")

    def __init__(self, metrics: RpcMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self.started = metrics.started.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def ended(self, code: grpc.StatusCode, seconds: float) -> None:
        """Count one call that ended with ``code`` after ``seconds``."""
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.handled.labels(*self._labels, code.name)
        child.inc()
        self.seconds.observe(seconds)


class RpcMetrics:
    """The per-RPC series of one process, shared by every server it runs.

    Give the same object to every server of a process that serves one registry (``relayd
    run``: relay node and key directory): the ``grpc_service`` label tells them apart.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by gRPC status code (streams: when they end)",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (streams: the stream's lifetime)",
            _LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self._methods: dict[str, _Method] = {}

    def method(self, full_name: str, grpc_type: str) -> _Method:
        """The children of ``/package.Service/Method`` (bound on first use)."""
        found = self._methods.get(full_name)
        if found is None:
            service, _, name = full_name.lstrip("/").partition("/")
            found = self._methods[full_name] = _Method(self, (service, name, grpc_type))
        return found

    def interceptor(self) -> RpcMetricsInterceptor:
        """A server interceptor counting into these series."""
        return RpcMetricsInterceptor(self)


def _code(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    """How a call ended: the code the servicer set or aborted with, else from ``exc``."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


def _measured(inner: Callable[..., Any], method: _Method) -> Callable[..., Any]:
    """``inner`` (a coroutine or async generator behaviour), counted and timed."""
    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            method.started.inc()
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                method.ended(_code(context, failure), time.perf_counter() - start)

        return stream

    async def call(request: Any, context: Any) -> Any:
        method.started.inc()
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await inner(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            method.ended(_code(context, failure), time.perf_counter() - start)

    return call


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call to a method the server has (see the module docstring).

    Put it first in the server's interceptors, so that calls refused by the interceptors
    after it (undecodable requests: INVALID_ARGUMENT) are counted too.
    """

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler of the call, measured."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        name = handler_call_details.method
        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            inner = _measured(handler.unary_unary, self._metrics.method(name, "unary"))
            return grpc.unary_unary_rpc_method_handler(inner, de, ser)
        if handler.unary_stream is not None:
            inner = _measured(handler.unary_stream, self._metrics.method(name, "server_stream"))
            return grpc.unary_stream_rpc_method_handler(inner, de, ser)
        if handler.stream_unary is not None:
            inner = _measured(handler.stream_unary, self._metrics.method(name, "client_stream"))
            return grpc.stream_unary_rpc_method_handler(inner, de, ser)
        if handler.stream_stream is not None:
            inner = _measured(handler.stream_stream, self._metrics.method(name, "bidi_stream"))
            return grpc.stream_stream_rpc_method_handler(inner, de, ser)
        return handler
