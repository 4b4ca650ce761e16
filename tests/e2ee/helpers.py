"""Helpers of the end-to-end tests: provisioned devices and reading decrypted messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, register_device
from relay.sdk.secure import SecureClient, SecureMessage

WAIT = 20.0


async def provision(keys_address: str, home: Path, user: str) -> DeviceState:
    """A new registered device of ``user`` (tenant "default"), its state open."""
    state = DeviceState.open(home)
    async with grpc.aio.insecure_channel(keys_address) as channel:
        await register_device(
            state, KeyDirectoryClient(channel), "default", user, one_time_prekeys=5
        )
    return state


def address(state: DeviceState) -> Address:
    own = state.address()
    assert own is not None
    return own


async def take(client: SecureClient, count: int) -> list[SecureMessage]:
    """The next ``count`` messages of ``client``, each acknowledged."""
    out: list[SecureMessage] = []
    if count == 0:
        return out
    messages = client.messages()
    try:
        async with asyncio.timeout(WAIT):
            async for message in messages:
                out.append(message)
                await client.ack(message)
                if len(out) == count:
                    break
    finally:
        await messages.aclose()
    return out
