"""One device's open Connect stream on the generator side: a reader and a writer task.

gRPC allows one outstanding write per call, so every frame for the stream (SendBatch
from the sender loop, AckBatch from the receiver) goes through a small outbox drained by
the writer task. Acks are coalesced: whatever ids piled up while a write was in flight
leave in one AckBatch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import grpc

from loadtest.devices import Identity
from loadtest.wire import ack_frame
from relaypb.relay.v1 import relay_pb2

#: Most message ids in one AckBatch frame.
MAX_ACK_IDS = 4096
#: Seconds a closing stream waits for its last acks to be written and the server to end.
CLOSE_TIMEOUT_S = 5.0


class StreamSink(Protocol):
    """Receives what the streams of a worker read."""

    def on_deliver(self, stream: DeviceStream, envelopes: Sequence[relay_pb2.Envelope]) -> None:
        """A Deliver frame arrived on ``stream``."""
        ...

    def on_results(self, stream: DeviceStream, results: relay_pb2.SendResults) -> None:
        """A SendResults frame arrived on ``stream``."""
        ...

    def on_queue_empty(self, stream: DeviceStream) -> None:
        """The QueueEmpty marker arrived on ``stream``."""
        ...

    def on_closed(self, stream: DeviceStream, error: str) -> None:
        """``stream`` ended on its own (``error``: the status code name, or EOF)."""
        ...


class DeviceStream:
    """An authenticated Connect stream of one simulated device."""

    def __init__(
        self, identity: Identity, node: int, call: Any, sink: StreamSink, *, late: bool
    ) -> None:
        self.identity = identity
        self.node = node
        #: Connected only for the drain (offline during the run, or reconnected).
        self.late = late
        #: A failed-over device's new stream: (lost, ready) CLOCK_MONOTONIC ns of the gap.
        self.away: tuple[int, int] | None = None
        #: The status details the call ended with (once it ended with an error).
        self.details = ""
        self.call = call
        self.open = True
        self.queue_empty = False
        self._sink = sink
        self._frames: deque[bytes] = deque()
        self._acks: list[bytes] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start reading and writing."""
        self._tasks = [
            asyncio.create_task(self._read(), name=f"read-{self.identity.index}"),
            asyncio.create_task(self._write(), name=f"write-{self.identity.index}"),
        ]

    @property
    def queued(self) -> int:
        """Frames waiting to be written."""
        return len(self._frames)

    def send(self, frame: bytes) -> None:
        """Queue one serialized ClientFrame."""
        self._frames.append(frame)
        self._idle.clear()
        self._wake.set()

    def ack(self, message_ids: Sequence[bytes]) -> None:
        """Queue message ids to acknowledge (coalesced into AckBatch frames)."""
        self._acks.extend(message_ids)
        self._idle.clear()
        self._wake.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._acks or self._frames:
                    if self._acks:
                        ids = self._acks[:MAX_ACK_IDS]
                        del self._acks[:MAX_ACK_IDS]
                        await self.call.write(ack_frame(ids))
                    if self._frames:
                        await self.call.write(self._frames.popleft())
                self._idle.set()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return  # the call ended: the reader reports how

    async def _read(self) -> None:
        error = "EOF"
        sink = self._sink
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                kind = frame.WhichOneof("frame")
                if kind == "deliver":
                    sink.on_deliver(self, frame.deliver.envelopes)
                elif kind == "send_results":
                    sink.on_results(self, frame.send_results)
                elif kind == "queue_empty":
                    self.queue_empty = True
                    sink.on_queue_empty(self)
        except grpc.aio.AioRpcError as exc:
            error = exc.code().name
            self.details = exc.details() or ""
        if self.open:
            self.open = False
            sink.on_closed(self, error)

    async def close(self) -> None:
        """End the stream (no on_closed callback).

        Pending acks are written and the call half-closed first, and the server gets a
        moment to end it, so that what was received is acknowledged; then it is cancelled.
        """
        was_open, self.open = self.open, False
        if was_open:
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._idle.wait()
                    await self.call.done_writing()
                    await self._tasks[0]  # the reader: until the server ends the call
        self.call.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
