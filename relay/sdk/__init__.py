"""Python SDK of the relay: device keys and state, the key directory, device sessions.

Typical use (end-to-end encrypted, every device of the recipient)::

    state = DeviceState.open("~/.relayctl")
    async with SecureClient(state, "127.0.0.1:50051", "127.0.0.1:50052") as client:
        await client.send("bob", b"hello")
        async for message in client.messages():
            ...

:class:`RelayClient` is the transport underneath (one device session, opaque content);
use it directly only for content that is already encrypted.
"""

from relay.sdk.backoff import Backoff, ExponentialBackoff
from relay.sdk.client import RelayClient
from relay.sdk.codec import Codec, PlaintextCodec
from relay.sdk.device import register_device, replenish_prekeys
from relay.sdk.directory import DeviceBundle, DeviceInfo, KeyDirectoryClient, PrekeyStatus
from relay.sdk.keys import Identity, Prekey
from relay.sdk.outbox import BatchResult, OutgoingMessage, SendReceipt
from relay.sdk.secure import SecureClient, SecureMessage, SecureReceipt
from relay.sdk.state import DeviceState, ReceivedMessage

__all__ = [
    "Backoff",
    "BatchResult",
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
    "SecureClient",
    "SecureMessage",
    "SecureReceipt",
    "SendReceipt",
    "register_device",
    "replenish_prekeys",
]
