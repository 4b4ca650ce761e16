"""Provision a new device: make its keys, keep the private parts, register it."""

from __future__ import annotations

from relay.model import Address
from relay.sdk.directory import KeyDirectoryClient
from relay.sdk.keys import DEFAULT_ONE_TIME_PREKEYS, Identity, Prekey, generate_one_time_prekeys
from relay.sdk.state import DeviceState


async def register_device(
    state: DeviceState,
    directory: KeyDirectoryClient,
    tenant: str,
    user: str,
    *,
    one_time_prekeys: int = DEFAULT_ONE_TIME_PREKEYS,
) -> Address:
    """Give the device in ``state`` keys, register it as a new device of ``user``.

    Private keys are stored before registering, so a crash in between never leaves a
    registered device without its keys. If the state already has an identity but no
    address (an earlier registration failed), that identity is registered. Returns the
    address, which is stored too. Raises FileExistsError if the state is registered.
    """
    if state.address() is not None:
        raise FileExistsError(f"{state.path} is already registered as {state.address()}")
    identity = state.identity()
    if identity is None:
        identity = Identity.generate()
        signed = Prekey.generate_signed(identity, 1)
        state.save_identity(identity, [signed, *generate_one_time_prekeys(2, one_time_prekeys)])
    prekeys = state.prekeys()
    signed_prekeys = [p for p in prekeys if p.signature]
    one_time = [p for p in prekeys if not p.signature]
    address = await directory.register(identity, tenant, user, signed_prekeys[-1], one_time)
    state.save_address(address)
    return address
