"""The RPCs under test, enumerated from the generated service descriptors."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from relaypb.keys.v1 import keys_pb2
from relaypb.relay.v1 import relay_pb2

KEY_DIRECTORY: ServiceDescriptor = keys_pb2.DESCRIPTOR.services_by_name["KeyDirectory"]
RELAY: ServiceDescriptor = relay_pb2.DESCRIPTOR.services_by_name["Relay"]


@dataclass(frozen=True)
class Rpc:
    """One method of one service: where to call it and what it takes and returns."""

    service: str
    name: str
    request: Descriptor
    response: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        """The full method name on the wire (also what signed requests sign)."""
        return f"/{self.service}/{self.name}"

    @property
    def unary(self) -> bool:
        """Whether the method takes one request and returns one response."""
        return not (self.client_streaming or self.server_streaming)

    @property
    def on_relay(self) -> bool:
        """Whether the relay node serves it (else the key directory does)."""
        return self.service == RELAY.full_name

    def parse_request(self, payload: bytes) -> Message | None:
        """``payload`` parsed as the request type, or None where the parser refuses it."""
        return parse(self.request, payload)

    def __str__(self) -> str:
        return self.name


def parse(descriptor: Descriptor, payload: bytes) -> Message | None:
    """``payload`` parsed as a ``descriptor`` message, or None where the parser refuses it."""
    message = GetMessageClass(descriptor)()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return None
    return message


def _rpcs(service: ServiceDescriptor) -> tuple[Rpc, ...]:
    return tuple(_rpc(service, m) for m in service.methods)


def _rpc(service: ServiceDescriptor, method: MethodDescriptor) -> Rpc:
    return Rpc(
        service=service.full_name,
        name=method.name,
        request=method.input_type,
        response=method.output_type,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


#: Every method of both services, in descriptor order.
ALL_RPCS: tuple[Rpc, ...] = _rpcs(KEY_DIRECTORY) + _rpcs(RELAY)
#: The methods that take one request and answer once.
UNARY_RPCS: tuple[Rpc, ...] = tuple(r for r in ALL_RPCS if r.unary)
#: The bidirectional streams (today: Relay.Connect).
STREAMING_RPCS: tuple[Rpc, ...] = tuple(r for r in ALL_RPCS if not r.unary)
#: Request types of every method, for "a message of another type" payloads.
REQUEST_TYPES: tuple[Descriptor, ...] = tuple(
    {r.request.full_name: r.request for r in ALL_RPCS}.values()
)
