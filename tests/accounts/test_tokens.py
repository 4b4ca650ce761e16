"""Registration policies: a `token` tenant takes new users only with a minted token."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyserver import tokens
from relay.clock import SystemClock
from relay.errors import AlreadyExists, InvalidArgument, PermissionDenied, Unauthenticated
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, register_device
from tests.accounts.conftest import TENANT_KEY, TOKEN_TENANT, signed_in

pytestmark = pytest.mark.integration


def mint(user: str, **kw: object) -> str:
    return tokens.mint(TENANT_KEY, TOKEN_TENANT, user, now_ms=SystemClock().now_ms(), **kw)  # type: ignore[arg-type]


async def test_a_token_tenant_needs_a_valid_unused_token_for_this_user(
    directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    now = SystemClock().now_ms()
    refused = {
        "": (Unauthenticated, "needs a registration token"),
        "rt1.garbage": (InvalidArgument, "damaged"),
        mint(f"{user}-other"): (PermissionDenied, "minted for"),
        tokens.mint(Ed25519PrivateKey.generate(), TOKEN_TENANT, user, now_ms=now): (
            Unauthenticated,
            "not signed by tenant",
        ),
        tokens.mint(TENANT_KEY, TOKEN_TENANT, user, now_ms=now - 3_600_000): (
            Unauthenticated,
            "expired",
        ),
        mint(user, purpose="reset"): (PermissionDenied, "is for 'reset'"),
    }
    with DeviceState.open(tmp_path / "d") as state:
        for token, (error, text) in refused.items():
            with pytest.raises(error, match=text):
                await register_device(
                    state, directory, TOKEN_TENANT, user, registration_token=token
                )
        good = mint(user)
        address = await register_device(
            state, directory, TOKEN_TENANT, user, registration_token=good
        )
        assert address == Address(TOKEN_TENANT, user, 1)
    # The same token again, from another device: the user exists (link instead).
    with DeviceState.open(tmp_path / "again") as again:
        with pytest.raises(AlreadyExists, match="link"):
            await register_device(again, directory, TOKEN_TENANT, user, registration_token=good)
        # A reset token works once: used again, it is refused.
        reset = mint(user, purpose="reset")
        await register_device(
            again, directory, TOKEN_TENANT, user, registration_token=reset, reset=True
        )
    with (
        DeviceState.open(tmp_path / "third") as third,
        pytest.raises(Unauthenticated, match="used before"),
    ):
        await register_device(
            third, directory, TOKEN_TENANT, user, registration_token=reset, reset=True
        )


async def test_an_open_tenant_refuses_resets(
    directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with DeviceState.open(tmp_path / "a") as first, DeviceState.open(tmp_path / "b") as second:
        await register_device(first, directory, "default", user, one_time_prekeys=1)
        with pytest.raises(PermissionDenied, match="open registration policy"):
            await register_device(second, directory, "default", user, reset=True)
        listed = await signed_in(directory, first).device_list("default", user)
        assert listed.numbers() == (1,)


async def test_a_reset_token_replaces_the_account_and_its_devices(
    directory: KeyDirectoryClient, tmp_path: Path, user: str
) -> None:
    with DeviceState.open(tmp_path / "old") as old, DeviceState.open(tmp_path / "new") as new:
        await register_device(old, directory, TOKEN_TENANT, user, registration_token=mint(user))
        before = await signed_in(directory, old).device_list(TOKEN_TENANT, user)
        address = await register_device(
            new,
            directory,
            TOKEN_TENANT,
            user,
            registration_token=mint(user, purpose="reset"),
            reset=True,
        )
        assert address == Address(TOKEN_TENANT, user, 2)  # numbers are never reused
        listed = await signed_in(directory, new).device_list(TOKEN_TENANT, user)
        assert listed.numbers() == (2,) and listed.version == 2
        assert listed.account_key != before.account_key
        with pytest.raises(Unauthenticated, match="not registered"):
            await signed_in(directory, old).device_list(TOKEN_TENANT, user)
