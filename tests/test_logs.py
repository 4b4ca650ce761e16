"""Logs: a request id in every line emitted while serving a call; text or JSON lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay import authproof
from relay.common import logs
from relay.common.convert import address_to_pb
from relay.common.grpcserver import GrpcServer
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.process import Relayd
from tests.support import Device, connect, envelope, register

pytestmark = pytest.mark.integration

HEX_ID = re.compile(r"[0-9a-f]{16}")
served = logging.getLogger("tests.served")


class Records(logging.Handler):
    """Keeps the records of ``tests.served`` with the request id filter applied."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(logs.RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    served.addHandler(handler)
    served.setLevel(logging.INFO)
    yield handler
    served.removeHandler(handler)


async def say(request: bytes, context: Any) -> bytes:
    served.info("serving %s", request.decode())
    await asyncio.sleep(0)  # another call may run here: its id must not leak into ours
    served.info("served %s", request.decode())
    return request


def add_echo(_servicer: object, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "tests.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
            ),
        )
    )


async def test_every_line_of_a_call_carries_its_request_id(records: Records) -> None:
    async with (
        GrpcServer("127.0.0.1:0", [(add_echo, None, "tests.Echo")]) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        call = channel.unary_unary("/tests.Echo/Say")
        given = (("x-request-id", "client-id.42"),)
        too_long = (("x-request-id", "x" * 65),)
        unprintable = (("x-request-id", "id with spaces"),)
        await asyncio.gather(
            call(b"a", metadata=given),
            call(b"b", metadata=too_long),
            call(b"c", metadata=unprintable),
            call(b"d"),
            call(b"e"),
        )
    by_request: dict[str, set[str]] = {}
    for record in records.records:
        by_request.setdefault(record.args[0], set()).add(record.request_id)  # type: ignore[index, attr-defined]
    assert by_request["a"] == {"client-id.42"}
    ids = []
    for name in "bcde":
        (rid,) = by_request[name]  # both lines of the call: one id
        assert HEX_ID.fullmatch(rid), rid
        ids.append(rid)
    assert len(set(ids)) == 4, "two calls shared a request id"
    served.info("outside any call")
    assert records.records[-1].request_id == "-"  # type: ignore[attr-defined]


class FakeContext:
    """What the interceptor asks of a servicer context: was the call cancelled?"""

    def __init__(self, cancelled: bool) -> None:
        self._cancelled = cancelled

    def cancelled(self) -> bool:
        return self._cancelled


class WriteFailed(Exception):
    """What gRPC's core raises for a write to a stream whose client is gone."""


@pytest.mark.parametrize("streaming", [False, True], ids=["coroutine", "async generator"])
async def test_a_failure_because_the_client_went_away_is_not_an_error(
    streaming: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC logs what a handler raises at ERROR with a traceback; when the client
    cancelled the call (a write to its stream then fails), the call ends quietly."""

    async def coroutine(requests: Any, context: Any) -> None:
        raise WriteFailed("execute_batch")

    async def generator(requests: Any, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise WriteFailed("execute_batch")

    handler = (
        grpc.stream_stream_rpc_method_handler(generator)
        if streaming
        else grpc.stream_stream_rpc_method_handler(coroutine)
    )

    async def continuation(_details: Any) -> Any:
        return handler

    details = SimpleNamespace(method="/tests.Flood/Go", invocation_metadata=())
    wrapped = await logs.RequestIds().intercept_service(continuation, details)  # type: ignore[arg-type]
    assert wrapped is not None and wrapped.stream_stream is not None

    async def run(context: FakeContext) -> None:
        assert wrapped is not None and wrapped.stream_stream is not None
        if streaming:
            async for _ in wrapped.stream_stream(iter(()), context):  # type: ignore[attr-defined]
                pass
        else:
            await wrapped.stream_stream(iter(()), context)

    caplog.set_level(logging.DEBUG, logger="relay.common.logs")
    await run(FakeContext(cancelled=True))  # quietly ended
    assert any("client went away mid-call (WriteFailed)" in r.getMessage() for r in caplog.records)
    with pytest.raises(WriteFailed):  # the client is still there: a real failure
        await run(FakeContext(cancelled=False))


def test_json_lines_carry_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("INFO", "json")
        token = logs.REQUEST_ID.set("rid-1")
        try:
            logging.getLogger("tests.json").info("hello %s", "there")
        finally:
            logs.REQUEST_ID.reset(token)
        logging.getLogger("tests.json").warning("no call")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["level"], x["logger"], x["message"], x["request_id"]) for x in lines] == [
        ("INFO", "tests.json", "hello there", "rid-1"),
        ("WARNING", "tests.json", "no call", "-"),
    ]
    assert all(x["time"] for x in lines)
    with pytest.raises(ValueError, match="xml"):
        logs.configure("INFO", "xml")


async def connect_unread(channel: grpc.aio.Channel, device: Device) -> Any:
    """A receiving Connect stream, authenticated, whose frames are not read by anyone."""
    call = relay_pb2_grpc.RelayStub(channel).Connect()
    hello = relay_pb2.Hello(address=address_to_pb(device.address), receive=True)
    await call.write(relay_pb2.ClientFrame(hello=hello))
    challenge = (await call.read()).challenge
    transcript = authproof.connect_transcript(
        challenge.nonce, challenge.node_id, challenge.server_time_ms, device.address
    )
    signature = device.signing_key.sign(transcript)
    await call.write(relay_pb2.ClientFrame(auth=relay_pb2.AuthResponse(signature=signature)))
    return call


async def wait_blocked(address: str) -> None:
    """Let the node fill the stalled stream's flow-control window (a round trip or two).

    A health check on another channel is answered after the node has run the writes
    queued before it; two of them cover the first Deliver frame and the next write.
    """
    for _ in range(2):
        async with grpc.aio.insecure_channel(address) as other:
            await health_pb2_grpc.HealthStub(other).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator[Relayd]:
    proc = Relayd(tmp_path / "data", extra_args=["--log-format", "json"])
    yield proc
    proc.stop()


async def test_relayd_json_log_with_request_ids_and_quiet_disconnects(relayd: Relayd) -> None:
    await relayd.start()
    alice = await register(relayd.keys_address, "alice")
    bob = await register(relayd.keys_address, "bob")
    async with grpc.aio.insecure_channel(relayd.relay_address) as channel:
        sender = await connect(channel, alice, receive=False)
        for _ in range(20):
            await sender.send(*[envelope(bob.address, b"x" * 10_000) for _ in range(50)])
        await sender.close()
    # Clients that go away mid-stream: one that reads nothing (the node's write of its
    # deliveries blocks on flow control, then fails), one with deliveries being written,
    # one with a send in flight.
    for _ in range(2):
        channel = grpc.aio.insecure_channel(relayd.relay_address)
        stalled = await connect_unread(channel, bob)
        await stalled.read()  # Ready; what follows stays unread
        await wait_blocked(relayd.relay_address)
        await channel.close()
        channel = grpc.aio.insecure_channel(relayd.relay_address)
        await connect(channel, bob)
        await channel.close()
        channel = grpc.aio.insecure_channel(relayd.relay_address)
        sending = await connect(channel, alice, receive=False)
        batch = [envelope(bob.address, b"y" * 1000) for _ in range(100)]
        await sending.call.write(
            relay_pb2.ClientFrame(send=relay_pb2.SendBatch(batch_id=1, envelopes=batch))
        )
        await channel.close()
    async with grpc.aio.insecure_channel(relayd.relay_address) as channel:
        receiver = await connect(channel, bob)  # the node still serves
        await receiver.frame()
        await receiver.close()
    assert relayd.stop() == 0
    lines = [json.loads(line) for line in relayd.log().splitlines() if line.strip()]
    assert lines, "relayd logged nothing"
    for line in lines:
        assert set(line) >= {"time", "level", "logger", "message", "request_id"}, line
        assert line["level"] not in ("ERROR", "CRITICAL"), line
        assert "exc_info" not in line, line
    created = [x for x in lines if x["message"].startswith("created account")]
    assert len(created) == 2
    assert all(HEX_ID.fullmatch(x["request_id"]) for x in created), created
    assert created[0]["request_id"] != created[1]["request_id"]
    startup = next(x for x in lines if x["message"].startswith("ready"))
    assert startup["request_id"] == "-"
    # Never a secret, key or ciphertext: no envelope bytes in any line.
    assert "xxxxxxxx" not in relayd.log() and "yyyyyyyy" not in relayd.log()


async def test_a_task_started_for_the_long_run_does_not_inherit_the_call_id() -> None:
    token = logs.REQUEST_ID.set("the-call")
    try:

        async def current() -> str:
            return logs.REQUEST_ID.get()

        assert await asyncio.create_task(current()) == "the-call"
        assert await asyncio.create_task(current(), context=logs.outside_calls()) == "-"
        assert logs.REQUEST_ID.get() == "the-call"
    finally:
        logs.REQUEST_ID.reset(token)
