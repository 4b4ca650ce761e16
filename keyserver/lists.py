"""Rules for a user's next signed device list (pure functions of the core)."""

from __future__ import annotations

from keyserver.model import AccountState
from relay.accounts import DeviceList
from relay.errors import FailedPrecondition, InvalidArgument, PermissionDenied


def check_next(state: AccountState, device_list: DeviceList, tenant: str, user: str) -> DeviceList:
    """Check that ``device_list`` may follow the user's current list; return the current.

    It must be well-formed, for this user, signed by the account key and of a higher
    version. InvalidArgument for a malformed list, PermissionDenied for one the account
    key did not sign, FailedPrecondition for a user without account or an old version.
    """
    if state.device_list is None or state.account_key is None:
        raise FailedPrecondition(f"user {tenant}/{user} has no account")
    device_list.check_shape()
    if (device_list.tenant, device_list.user) != (tenant, user):
        raise InvalidArgument(f"device_list is for another user than {tenant}/{user}")
    if device_list.account_key != state.account_key or not device_list.verifies():
        raise PermissionDenied(f"device_list is not signed by the account key of {tenant}/{user}")
    if device_list.version <= state.device_list.version:
        raise FailedPrecondition(
            f"device_list.version {device_list.version} must be above the current "
            f"{state.device_list.version}",
            metadata={"min_version": str(state.device_list.version + 1)},
        )
    return state.device_list
