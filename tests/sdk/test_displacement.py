"""A displacement is final for the SDK only when the relay names a newer session.

The relay here is a fake one (a real gRPC server on port 0): it answers the handshake
with a Ready of a known epoch and then ends the first session as SESSION_DISPLACED,
naming whatever epoch the test chooses (or none). The real relay's displacement is
tested in tests/sdk/test_client.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.common.grpcserver import GrpcServer
from relay.common.status import abort
from relay.errors import SessionDisplaced
from relay.model import Address
from relay.sdk import DeviceState, RelayClient
from relay.sdk.keys import Identity
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.sdk.helpers import RecordingBackoff

pytestmark = pytest.mark.integration

TIMEOUT = 30
BOB = Address("default", "bob", 1)
FIRST_EPOCH = 1_000


class DisplacingRelay(relay_pb2_grpc.RelayServicer):
    """Ends the first session with SESSION_DISPLACED naming ``displaced_by``; keeps the rest."""

    def __init__(self, displaced_by: str | None) -> None:
        self.displaced_by = displaced_by
        self.epochs: list[int] = []
        self.connected = asyncio.Event()
        self.go = asyncio.Event()

    async def Connect(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        """Hello, Challenge, Auth (not checked), Ready; then displace or hold."""
        await context.read()
        await context.write(
            relay_pb2.ServerFrame(
                challenge=relay_pb2.Challenge(nonce=b"n" * 32, node_id="fake", server_time_ms=1)
            )
        )
        await context.read()
        epoch = FIRST_EPOCH + len(self.epochs)
        self.epochs.append(epoch)
        await context.write(
            relay_pb2.ServerFrame(ready=relay_pb2.Ready(node_id="fake", session_epoch=epoch))
        )
        self.connected.set()
        if len(self.epochs) > 1:
            await asyncio.Event().wait()  # later sessions stay open until cancelled
        await self.go.wait()
        metadata = {} if self.displaced_by is None else {"session_epoch": self.displaced_by}
        await abort(context, SessionDisplaced("displaced", metadata=metadata))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[DeviceState]:
    with DeviceState.open(tmp_path / "bob") as s:
        s.save_identity(Identity.generate())
        s.save_address(BOB)
        yield s


async def serve(fake: DisplacingRelay) -> GrpcServer:
    return GrpcServer(
        "127.0.0.1:0",
        [(relay_pb2_grpc.add_RelayServicer_to_server, fake, "relaypb.relay.v1.Relay")],
        grace_seconds=0.1,
    )


@pytest.mark.parametrize(
    "displaced_by", [None, "", "not a number", str(FIRST_EPOCH), str(FIRST_EPOCH - 1)]
)
async def test_a_displacement_naming_no_newer_session_is_reconnected(
    state: DeviceState, displaced_by: str | None
) -> None:
    fake = DisplacingRelay(displaced_by)
    backoff = RecordingBackoff()
    async with await serve(fake) as server, asyncio.timeout(TIMEOUT):
        client = RelayClient(state, server.address, backoff=backoff)
        try:
            await client.start()
            await client.wait_ready()
            assert client.session_epoch == FIRST_EPOCH
            fake.connected.clear()
            fake.go.set()
            await fake.connected.wait()  # the client came back
            await client.wait_ready()
            assert client.error is None
            assert backoff.attempts == [1]
            assert fake.epochs == [FIRST_EPOCH, FIRST_EPOCH + 1]
        finally:
            await client.close()


async def test_a_displacement_by_a_newer_session_is_final(state: DeviceState) -> None:
    fake = DisplacingRelay(str(FIRST_EPOCH + 1))
    backoff = RecordingBackoff()
    async with await serve(fake) as server, asyncio.timeout(TIMEOUT):
        client = RelayClient(state, server.address, backoff=backoff)
        try:
            await client.start()
            await client.wait_ready()
            fake.go.set()
            with pytest.raises(SessionDisplaced) as info:
                await client.wait_queue_empty()
            assert info.value.metadata["session_epoch"] == str(FIRST_EPOCH + 1)
            assert isinstance(client.error, SessionDisplaced)
            assert backoff.attempts == []
            assert fake.epochs == [FIRST_EPOCH]
        finally:
            await client.close()
