"""Python SDK of the relay: device keys and state, the key directory, device sessions.

Typical use::

    state = DeviceState.open("~/.relayctl")
    async with RelayClient(state, "127.0.0.1:50051") as client:
        await client.send(Address("default", "bob", 1), b"hello")
        async for message in client.messages():
            ...
"""

from relay.sdk.backoff import Backoff, ExponentialBackoff
from relay.sdk.client import RelayClient
from relay.sdk.codec import Codec, PlaintextCodec
from relay.sdk.device import register_device, replenish_prekeys
from relay.sdk.directory import DeviceBundle, DeviceInfo, KeyDirectoryClient, PrekeyStatus
from relay.sdk.keys import Identity, Prekey
from relay.sdk.outbox import OutgoingMessage, SendReceipt
from relay.sdk.state import DeviceState, ReceivedMessage

__all__ = [
    "Backoff",
    "Codec",
    "DeviceBundle",
    "DeviceInfo",
    "DeviceState",
    "ExponentialBackoff",
    "Identity",
    "KeyDirectoryClient",
    "OutgoingMessage",
    "PlaintextCodec",
    "Prekey",
    "PrekeyStatus",
    "ReceivedMessage",
    "RelayClient",
    "SendReceipt",
    "register_device",
    "replenish_prekeys",
]
