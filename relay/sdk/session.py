"""One Connect stream of a device: the handshake and framed reads and writes."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from relay.errors import RelayError, Unavailable
from relay.model import Address
from relay.sdk.directory import to_pb
from relay.sdk.keys import Identity
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc

CLIENT_VERSION = "relay-sdk-python/0.1"
#: Options of the channels the SDK makes: keepalive pings find dead connections.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)

Call = grpc.aio.StreamStreamCall[relay_pb2.ClientFrame, relay_pb2.ServerFrame]


class Session:
    """One Connect call. Writes are serialised: grpc.aio allows one at a time."""

    def __init__(self, stub: relay_pb2_grpc.RelayAsyncStub) -> None:
        self.call: Call = stub.Connect()
        self.lock = asyncio.Lock()
        #: Set once the relay sent Ready.
        self.ready: relay_pb2.Ready | None = None

    async def authenticate(
        self, identity: Identity, address: Address, *, receive: bool
    ) -> relay_pb2.Ready:
        """Hello -> Challenge -> AuthResponse -> Ready.

        Raises Unavailable if the stream ends, or the call's AioRpcError.
        """
        hello = relay_pb2.Hello(
            address=to_pb(address), receive=receive, client_version=CLIENT_VERSION
        )
        await self.call.write(relay_pb2.ClientFrame(hello=hello))
        challenge = (await self.read("challenge")).challenge
        signature = identity.connect_signature(
            challenge.nonce, challenge.node_id, challenge.server_time_ms, address
        )
        auth = relay_pb2.AuthResponse(signature=signature)
        await self.call.write(relay_pb2.ClientFrame(auth=auth))
        self.ready = (await self.read("ready")).ready
        return self.ready

    async def write(self, frame: relay_pb2.ClientFrame) -> None:
        """Write one frame; a stream that has ended is left for :meth:`read` to report."""
        async with self.lock:
            await self.write_locked(frame)

    async def write_locked(self, frame: relay_pb2.ClientFrame) -> None:
        """:meth:`write` for a caller that holds :attr:`lock`."""
        with contextlib.suppress(asyncio.InvalidStateError):
            await self.call.write(frame)

    async def read(self, expect: str = "") -> relay_pb2.ServerFrame:
        """The next frame (of kind ``expect`` if given).

        Raises Unavailable at the end of a stream closed without an error status, the
        call's AioRpcError if it failed, or RelayError for a frame out of protocol.
        """
        frame = await self.call.read()
        if frame is grpc.aio.EOF:
            raise Unavailable("relay closed the stream")
        assert isinstance(frame, relay_pb2.ServerFrame)
        kind = frame.WhichOneof("frame")
        if expect and kind != expect:
            raise RelayError(f"relay sent a {kind} frame where {expect} was due")
        return frame

    def cancel(self) -> None:
        """End the call (idempotent)."""
        self.call.cancel()
