"""A grpc.aio server with health checking and reflection, as an async context manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from relay.common.decode_guard import DecodeGuard
from relay.common.logs import RequestIds

#: gRPC message size cap; envelopes are limited far below it by configuration.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

AddServicer = Callable[[Any, grpc.aio.Server], None]
log = logging.getLogger(__name__)

#: Shutdown may take the grace period plus this long before the rest is abandoned.
SHUTDOWN_MARGIN_SECONDS = 15.0


async def drain_delay(seconds: float, hurry: asyncio.Event | None = None) -> None:
    """Wait ``seconds`` (the drain delay: load balancers polling health), or until ``hurry``.

    The delay is the point, not a stand-in for an event: a second signal sets ``hurry``.
    """
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for((hurry or asyncio.Event()).wait(), seconds)


async def bounded_close(stack: contextlib.AsyncExitStack, seconds: float) -> None:
    """Close ``stack``, but never wait longer than ``seconds``.

    A stuck resource (a peer that stopped answering, a driver thread) must not hang the
    shutdown of a process.
    """
    closing = asyncio.ensure_future(stack.aclose())
    done, _ = await asyncio.wait({closing}, timeout=seconds)
    if done:
        closing.result()
        return
    # Say where it is stuck before giving up: the stuck await and every other task.
    others = [t for t in asyncio.all_tasks() if t is not closing and not t.done()]
    log.error(
        "shutdown did not finish within %.0f s; abandoning what is left. Stuck at:\n%s"
        "%d other tasks: %s",
        seconds,
        "".join(_stack_lines(closing)),
        len(others),
        "; ".join(f"{t.get_name()} at {''.join(_stack_lines(t)).strip()}" for t in others[:20]),
    )
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await closing


def _stack_lines(task: asyncio.Future[Any]) -> list[str]:
    """File:line of each coroutine ``task`` is suspended in, outermost first."""
    if not isinstance(task, asyncio.Task):
        return []
    lines: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(lines) < 30:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}\n")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


#: The channel argument that makes a bind fail when another process holds the port.
REUSEPORT_OFF = ("grpc.so_reuseport", 0)


class GrpcServer:
    """Serve ``services`` on ``listen`` (``host:port``; port 0 picks a free port).

    With ``credentials`` (relay.common.tls.server_credentials) the port serves TLS.
    ``interceptors`` run between the built-in RequestIds (every call's log lines carry
    its request id, relay.common.logs) and DecodeGuard, outermost first.

    ``services`` pairs each ``add_XServicer_to_server`` function with its servicer and
    full service name. ``grpc.health.v1`` reports SERVING for each while running, and
    server reflection lists them.
    """

    def __init__(
        self,
        listen: str,
        services: Sequence[tuple[AddServicer, Any, str]],
        *,
        grace_seconds: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._listen = listen
        self._interceptors = list(interceptors)
        self._credentials = credentials
        self._services = services
        self._grace = grace_seconds
        self._options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # grpcio binds with SO_REUSEPORT by default: a second process started on the
            # same port would then split its traffic silently. Only ``relayd relay
            # --processes N`` shares a port, on purpose (it passes 1).
            *([] if any(k == "grpc.so_reuseport" for k, _ in options) else [REUSEPORT_OFF]),
            *options,
        ]
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after start)."""
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving."""
        server = grpc.aio.server(
            options=self._options,
            interceptors=[RequestIds(), *self._interceptors, DecodeGuard()],
        )
        names = []
        for add, servicer, name in self._services:
            add(servicer, server)
            names.append(name)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        try:  # grpcio raises RuntimeError or returns 0, depending on the version
            if self._credentials is None:
                self.port = server.add_insecure_port(self._listen)
            else:
                self.port = server.add_secure_port(self._listen, self._credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"cannot listen on {self._listen}: the address is in use (another process "
                "holds the port?) or not an address of this host"
            )
        await server.start()
        for name in [*names, ""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    async def not_serving(self) -> None:
        """Report NOT_SERVING for every service (and ``""``) from now on; keep serving.

        The first step of a drain: load balancers and health probes stop sending new
        traffic here while open calls go on.
        """
        await self._health.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Report NOT_SERVING, then stop, letting open calls finish within the grace period."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._grace)
        self._server = None

    async def wait(self) -> None:
        """Wait until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
