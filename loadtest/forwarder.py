"""The bare grpc.aio forwarder: the baseline the relay's figures are divided by.

It speaks the same ``relaypb.relay.v1.Relay`` Connect protocol with a trivial handshake
(the challenge is all zeros and the answer is not checked) and only forwards: each
envelope of a SendBatch is pushed to the recipient's open stream, answered STORED at
once, and delivered in Deliver frames of up to 256 envelopes (the relay's page). No
store, no fsync, no signature checks, no acks kept. Envelopes for a device without a
stream wait in memory (up to 10,000 per device) until it connects. It also answers
``KeyDirectory.RegisterDevice`` (numbering devices per user) so that the generator drives
it exactly as it drives ``relayd``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections import defaultdict
from typing import Any

import grpc

from relay.common.grpcserver import GrpcServer
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc

DELIVER_PAGE = 256
MAX_HELD = 10_000
NODE_ID = "forwarder"
RELAY_SERVICE = "relaypb.relay.v1.Relay"
KEYS_SERVICE = "relaypb.keys.v1.KeyDirectory"

Key = tuple[str, str, int]


def _key(address: Any) -> Key:
    return (address.tenant, address.user, address.device)


class _Session:
    """A receiving stream: envelopes waiting to be written, and its writer's wake-up."""

    def __init__(self, context: Any, lock: asyncio.Lock, held: list[Any]) -> None:
        self.context = context
        self.lock = lock
        self.outbox: list[Any] = held
        self.wake = asyncio.Event()

    def push(self, envelope: Any) -> None:
        self.outbox.append(envelope)
        self.wake.set()

    async def deliver(self) -> None:
        """Write what was held, QueueEmpty, then whatever arrives, in pages."""
        await self._flush()
        async with self.lock:
            await self.context.write(relay_pb2.ServerFrame(queue_empty=relay_pb2.QueueEmpty()))
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        while self.outbox:
            page, self.outbox = self.outbox[:DELIVER_PAGE], self.outbox[DELIVER_PAGE:]
            frame = relay_pb2.ServerFrame(deliver=relay_pb2.Deliver(envelopes=page))
            async with self.lock:
                await self.context.write(frame)


class Forwarder(relay_pb2_grpc.RelayServicer):
    """Connect streams that forward envelopes to each other, and nothing else."""

    def __init__(self) -> None:
        self.sessions: dict[Key, _Session] = {}
        self.held: defaultdict[Key, list[Any]] = defaultdict(list)

    async def Connect(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        """Trivial handshake, then forward sends and ignore acks."""
        hello = await context.read()
        if hello is grpc.aio.EOF or hello.WhichOneof("frame") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a hello frame")
        await context.write(
            relay_pb2.ServerFrame(
                challenge=relay_pb2.Challenge(
                    nonce=bytes(32), node_id=NODE_ID, server_time_ms=int(time.time() * 1000)
                )
            )
        )
        if await context.read() is grpc.aio.EOF:
            return
        await context.write(
            relay_pb2.ServerFrame(ready=relay_pb2.Ready(node_id=NODE_ID, session_epoch=1))
        )
        me = hello.hello.address
        key = _key(me)
        lock = asyncio.Lock()
        session: _Session | None = None
        writer: asyncio.Task[None] | None = None
        if hello.hello.receive:
            session = _Session(context, lock, self.held.pop(key, []))
            self.sessions[key] = session
            writer = asyncio.create_task(session.deliver())
        try:
            await self._forward(context, me, lock)
        finally:
            if session is not None and self.sessions.get(key) is session:
                del self.sessions[key]
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    async def _forward(self, context: Any, me: Any, lock: asyncio.Lock) -> None:
        while True:
            frame = await context.read()
            if frame is grpc.aio.EOF:
                return
            if frame.WhichOneof("frame") != "send":
                continue  # acks: nothing is kept, nothing to remove
            now_ms = int(time.time() * 1000)
            results = []
            for env in frame.send.envelopes:
                env.sender.CopyFrom(me)
                env.server_timestamp_ms = now_ms
                results.append(self._route(env))
            reply = relay_pb2.ServerFrame(
                send_results=relay_pb2.SendResults(batch_id=frame.send.batch_id, results=results)
            )
            async with lock:
                await context.write(reply)

    async def Send(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    def _route(self, env: Any) -> relay_pb2.SendResult:
        key = _key(env.recipient)
        target = self.sessions.get(key)
        if target is not None:
            target.push(env)
        elif len(self.held[key]) < MAX_HELD:
            self.held[key].append(env)
        else:
            return relay_pb2.SendResult(
                message_id=env.message_id,
                recipient=env.recipient,
                outcome=relay_pb2.OUTCOME_REJECTED,
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                message="forwarder holds at most 10000 envelopes per offline device",
                limit="max_queue_depth",
            )
        return relay_pb2.SendResult(
            message_id=env.message_id, recipient=env.recipient, outcome=relay_pb2.OUTCOME_STORED
        )


class TrivialKeys(keys_pb2_grpc.KeyDirectoryServicer):
    """RegisterDevice that numbers devices per user and checks nothing."""

    def __init__(self) -> None:
        self.devices: defaultdict[tuple[str, str], int] = defaultdict(int)

    async def RegisterDevice(
        self, request: keys_pb2.RegisterDeviceRequest, context: Any
    ) -> keys_pb2.RegisterDeviceResponse:
        """A new device number for the user."""
        self.devices[(request.tenant, request.user)] += 1
        reply = keys_pb2.RegisterDeviceResponse()
        reply.address.tenant = request.tenant
        reply.address.user = request.user
        reply.address.device = self.devices[(request.tenant, request.user)]
        return reply

    async def PublishPrekeys(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def FetchPrekeyBundles(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def ListDevices(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def CountOneTimePrekeys(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def GetIdentityKey(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def RemoveDevice(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def RequestLink(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def ListLinkRequests(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def ApproveLink(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def CompleteLink(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)

    async def GetDeviceList(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await _unimplemented(context)


async def _unimplemented(context: Any) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the forwarder only forwards")


def server(listen: str) -> GrpcServer:
    """A GrpcServer (health checked) serving the forwarder and its trivial key directory."""
    return GrpcServer(
        listen,
        [
            (relay_pb2_grpc.add_RelayServicer_to_server, Forwarder(), RELAY_SERVICE),
            (keys_pb2_grpc.add_KeyDirectoryServicer_to_server, TrivialKeys(), KEYS_SERVICE),
        ],
        grace_seconds=1.0,
    )


async def serve(listen: str) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server(listen) as srv:
        print(f"forwarder listening on {srv.address}", flush=True)
        await stop.wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``relay-loadtest forwarder``."""
    p.add_argument(
        "--listen",
        default="127.0.0.1:50061",
        help="host:port for both the Relay and the KeyDirectory services (default: %(default)s)",
    )


def command(args: argparse.Namespace) -> int:
    """``relay-loadtest forwarder``."""
    import uvloop  # noqa: PLC0415

    uvloop.run(serve(args.listen))
    return 0
