"""Protobuf <-> domain translation of shared types (both services and the SDK use it)."""

from __future__ import annotations

from relay.accounts import DeviceList, ListedDevice
from relay.model import Address, Envelope, Outcome
from relaypb.common.v1 import address_pb2
from relaypb.keys.v1 import keys_pb2
from relaypb.relay.v1 import relay_pb2


def address_from_pb(pb: address_pb2.Address) -> Address:
    """Domain Address from its protobuf form (not validated)."""
    return Address(pb.tenant, pb.user, pb.device)


def address_to_pb(address: Address) -> address_pb2.Address:
    """Protobuf Address from the domain form."""
    return address_pb2.Address(tenant=address.tenant, user=address.user, device=address.device)


#: Protobuf forms of recently seen addresses (copied into messages, never changed);
#: emptied when it reaches ``_MAX_CACHED_ADDRESSES``.
_address_pbs: dict[Address, address_pb2.Address] = {}
_MAX_CACHED_ADDRESSES = 100_000


def cached_address_pb(address: Address) -> address_pb2.Address:
    """``address_to_pb(address)``, shared: copy it into a message, never change it."""
    pb = _address_pbs.get(address)
    if pb is None:
        if len(_address_pbs) >= _MAX_CACHED_ADDRESSES:
            _address_pbs.clear()
        pb = _address_pbs[address] = address_to_pb(address)
    return pb


def fill_envelope(pb: relay_pb2.Envelope, env: Envelope) -> None:
    """Write ``env`` into the empty message ``pb``, for delivery to a device or a peer.

    Fill the message in place (``repeated.add()``, or a field of the frame): building an
    Envelope message and copying it into its frame costs twice as much (2.7 against
    1.3 us per envelope in a frame of 20).
    """
    pb.message_id = env.message_id
    pb.content = env.content
    if env.ephemeral:
        pb.ephemeral = True
    pb.server_timestamp_ms = env.server_timestamp_ms
    pb.sender.CopyFrom(cached_address_pb(env.sender))
    pb.recipient.CopyFrom(cached_address_pb(env.recipient))


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


def device_list_from_pb(pb: keys_pb2.SignedDeviceList) -> DeviceList:
    """Domain DeviceList from its protobuf form (neither checked nor verified)."""
    return DeviceList(
        tenant=pb.tenant,
        user=pb.user,
        version=pb.version,
        timestamp_ms=pb.timestamp_ms,
        devices=tuple(
            ListedDevice(d.device, d.identity_key, d.registration_id) for d in pb.devices
        ),
        account_key=pb.account_key,
        signature=pb.signature,
    )


def device_list_to_pb(device_list: DeviceList) -> keys_pb2.SignedDeviceList:
    """Protobuf SignedDeviceList from the domain form."""
    return keys_pb2.SignedDeviceList(
        tenant=device_list.tenant,
        user=device_list.user,
        version=device_list.version,
        timestamp_ms=device_list.timestamp_ms,
        devices=[
            keys_pb2.ListedDevice(
                device=d.device, identity_key=d.identity_key, registration_id=d.registration_id
            )
            for d in device_list.devices
        ],
        account_key=device_list.account_key,
        signature=device_list.signature,
    )
