"""Protobuf <-> domain translation for the relay API (servicers and the SDK share it)."""

from __future__ import annotations

from relay.model import Address, Envelope, Outcome
from relaypb.common.v1 import address_pb2
from relaypb.relay.v1 import relay_pb2


def address_from_pb(pb: address_pb2.Address) -> Address:
    """Domain Address from its protobuf form (not validated)."""
    return Address(pb.tenant, pb.user, pb.device)


def address_to_pb(address: Address) -> address_pb2.Address:
    """Protobuf Address from the domain form."""
    return address_pb2.Address(tenant=address.tenant, user=address.user, device=address.device)


def envelope_from_pb(pb: relay_pb2.Envelope, sender: Address) -> Envelope:
    """Domain Envelope from a client's protobuf; the sender comes from authentication."""
    return Envelope(
        message_id=pb.message_id,
        sender=sender,
        recipient=address_from_pb(pb.recipient),
        content=pb.content,
        ephemeral=pb.ephemeral,
        ttl_seconds=pb.ttl_seconds,
    )


def envelope_to_pb(env: Envelope) -> relay_pb2.Envelope:
    """Protobuf Envelope for delivery to a device."""
    return relay_pb2.Envelope(
        message_id=env.message_id,
        sender=address_to_pb(env.sender),
        recipient=address_to_pb(env.recipient),
        content=env.content,
        ephemeral=env.ephemeral,
        server_timestamp_ms=env.server_timestamp_ms,
    )


OUTCOME_TO_PB: dict[Outcome, relay_pb2.Outcome.ValueType] = {
    Outcome.STORED: relay_pb2.OUTCOME_STORED,
    Outcome.DUPLICATE: relay_pb2.OUTCOME_DUPLICATE,
    Outcome.DELIVERED: relay_pb2.OUTCOME_DELIVERED,
    Outcome.RECIPIENT_OFFLINE: relay_pb2.OUTCOME_RECIPIENT_OFFLINE,
    Outcome.REJECTED: relay_pb2.OUTCOME_REJECTED,
}


def envelope_from_wire(pb: relay_pb2.Envelope) -> Envelope:
    """Domain Envelope as another relay node forwarded it (sender and time already set)."""
    return Envelope(
        message_id=pb.message_id,
        sender=address_from_pb(pb.sender),
        recipient=address_from_pb(pb.recipient),
        content=pb.content,
        ephemeral=pb.ephemeral,
        server_timestamp_ms=pb.server_timestamp_ms,
    )
