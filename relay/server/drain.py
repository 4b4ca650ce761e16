"""Graceful drain of a relay node: what SIGTERM does before the servers stop.

The sequence (``RelayApp.drain``, driven by ``relayd``):

1. ``grpc.health.v1`` says NOT_SERVING for ``""`` and every service, so load balancers
   and probes stop sending new traffic here; everything keeps being served.
2. After ``node.drain_delay_seconds`` (cut short by a second signal) the drain
   *begins*: every device session on the node, receiving or send-only, is ended with
   :class:`relay.errors.Draining` (UNAVAILABLE, reason NODE_DRAINING), which the SDK
   answers by reconnecting to another node at once. New Connect streams are refused
   with the same error, and a stream that was mid-handshake when the drain began gets
   it at its next read (so no session opened in that window outlives the drain).
3. The servers stop (``GrpcServer.stop``): open unary sends get ``node.grace_seconds``
   to finish; a SendBatch cut off in an ended stream is resent by the SDK with the same
   message id (idempotent), so nothing is lost.

:class:`Drain` holds the one fact the rest depends on (has the drain begun?), and
:class:`DrainGuard` is the server interceptor that applies it to Connect streams
without touching the servicer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from relay.common.status import abort
from relay.core.sessions import Session, SessionRegistry
from relay.errors import Draining

log = logging.getLogger(__name__)

#: The device stream; the unary Send is left to the server's grace period.
CONNECT_METHOD = "/relaypb.relay.v1.Relay/Connect"


class Drain:
    """Whether this node's drain has begun, and the error its sessions end with."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id
        self._begun = False

    @property
    def begun(self) -> bool:
        """True once device sessions are being ended and new ones refused."""
        return self._begun

    def error(self) -> Draining:
        """The Draining error naming this node."""
        return Draining(
            f"relay node {self._node_id} is shutting down: reconnect to another relay node "
            "now (this one refuses new sessions until it stops)",
            metadata={"node_id": self._node_id},
        )

    def begin(self, sessions: SessionRegistry) -> int:
        """Refuse new Connect streams and end every session in ``sessions``.

        Returns how many sessions were ended. Idempotent (a second call ends sessions
        that opened since, which the guard makes impossible, so it ends none).
        """
        self._begun = True
        ended = 0
        for session in every_session(sessions):
            session.end(self.error())
            ended += 1
        return ended

    def guard(self) -> DrainGuard:
        """The server interceptor that applies this drain to Connect streams."""
        return DrainGuard(self)


def every_session(sessions: SessionRegistry) -> list[Session]:
    """Every session in ``sessions``: the receiving ones, then the send-only ones."""
    return sessions.every()


class _DrainingContext:
    """A Connect call's context whose ``read()`` raises Draining once the drain began."""

    def __init__(self, context: Any, drain: Drain) -> None:
        self._context = context
        self._drain = drain

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        """The next frame, unless the drain has begun (then Draining ends the stream)."""
        if self._drain.begun:
            raise self._drain.error()
        return await self._context.read()


class DrainGuard(grpc.aio.ServerInterceptor):
    """Refuse Connect streams once the drain began; end those mid-handshake at their next read.

    Other methods pass untouched. A plain flag check per read: no task per frame.
    """

    def __init__(self, drain: Drain) -> None:
        self._drain = drain

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The Connect handler wrapped; any other handler as it is."""
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler_call_details.method != CONNECT_METHOD
            or handler.stream_stream is None
            or inspect.isasyncgenfunction(handler.stream_stream)
        ):
            return handler
        inner: Any = handler.stream_stream  # a coroutine function (checked above)
        drain = self._drain

        async def connect(requests: Any, context: Any) -> Any:
            if drain.begun:
                await abort(context, drain.error())
            return await inner(requests, _DrainingContext(context, drain))

        return grpc.stream_stream_rpc_method_handler(
            connect, handler.request_deserializer, handler.response_serializer
        )
