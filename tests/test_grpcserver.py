"""GrpcServer: one process per port unless a port is shared on purpose."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay.common.grpcserver import GrpcServer


def _health(servicer: object, server: object) -> None:
    """Nothing to add: every GrpcServer serves grpc.health.v1 itself."""


SERVICES = [(_health, None, "tests.Nothing")]


async def test_a_second_server_on_a_taken_port_fails_with_a_clear_error() -> None:
    """grpcio binds with SO_REUSEPORT by default: without turning it off, a second relayd
    started on the same port would take half of the first one's connections."""
    async with GrpcServer("127.0.0.1:0", SERVICES) as first:
        second = GrpcServer(first.address, SERVICES)
        with pytest.raises(OSError, match=r"cannot listen on .*: the address is in use"):
            await second.start()
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_port_sharing_on_purpose_still_works() -> None:
    shared = [("grpc.so_reuseport", 1)]
    async with GrpcServer("127.0.0.1:0", SERVICES, options=shared) as first:
        second = GrpcServer(first.address, SERVICES, options=shared)
        async with second:
            assert second.port == first.port
