"""Accounts on the device: signing this user's device lists, checking peers' lists.

* **Signing.** The first device of a user makes the account key (Ed25519) and signs
  the first list; every device linked later gets the private key from one already
  linked (relay/sdk/linking.py), so any of them can sign the next list (to add or
  remove a device).
* **Checking (trust on first use).** Before this device encrypts to a device of any
  user, it verifies that user's list: signed by the account key, and that key the one
  pinned when this device first met the user. A changed key stops every send to the
  user with :class:`AccountKeyChanged` until the person accepts it (:meth:`Accounts.trust`,
  ``relayctl trust USER``), ideally after comparing :func:`safety_number` out of band.
  A device that appears in a peer's list is reported (``on_new_device``), never added
  silently. A list older than the pinned one is refused (the directory replaying an
  old list to bring back a removed device).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.accounts import DeviceList, ListedDevice, build_list
from relay.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from relay.model import Address
from relay.sdk.state import DeviceState

log = logging.getLogger(__name__)

#: Iterations of the safety-number hash (as Signal's numeric fingerprints).
SAFETY_ITERATIONS = 5200
_SAFETY_VERSION = b"\x00\x00"

NewDeviceCallback = Callable[[Address], None]


class AccountKeyChanged(FailedPrecondition):
    """A peer user's account key is not the one pinned.

    The user reset their account, or someone else speaks for them. Sends to the user
    stop until it is trusted.
    """

    reason = "ACCOUNT_KEY_CHANGED"


def generate_account_key() -> bytes:
    """A new private account key (32 raw bytes)."""
    return Ed25519PrivateKey.generate().private_bytes_raw()


def account_public(private: bytes) -> bytes:
    """The public account key (32 bytes) of a private one."""
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def sign_list(private: bytes, unsigned: DeviceList) -> DeviceList:
    """``unsigned`` with the account key's signature (its account_key must match)."""
    if unsigned.account_key != account_public(private):
        raise ValueError("the list names another account key than the one signing it")
    signature = Ed25519PrivateKey.from_private_bytes(private).sign(unsigned.transcript())
    return DeviceList(
        unsigned.tenant,
        unsigned.user,
        unsigned.version,
        unsigned.timestamp_ms,
        unsigned.devices,
        unsigned.account_key,
        signature,
    )


def next_list(
    private: bytes,
    current: DeviceList,
    now_ms: int,
    *,
    add: Iterable[ListedDevice] = (),
    remove: Iterable[int] = (),
) -> DeviceList:
    """The list after ``current``: devices added and removed, version + 1, signed."""
    gone = set(remove)
    devices = [d for d in current.devices if d.device not in gone] + list(add)
    unsigned = build_list(
        current.tenant,
        current.user,
        current.version + 1,
        max(now_ms, current.timestamp_ms),
        devices,
        account_key=account_public(private),
    )
    return sign_list(private, unsigned)


def _fingerprint(identifier: str, key: bytes) -> bytes:
    digest = _SAFETY_VERSION + key + identifier.encode()
    for _ in range(SAFETY_ITERATIONS):
        digest = hashlib.sha512(digest + key).digest()
    return digest[:30]


def _digits(fingerprint: bytes) -> str:
    chunks = [fingerprint[i : i + 5] for i in range(0, 30, 5)]
    return "".join(f"{int.from_bytes(c, 'big') % 100_000:05d}" for c in chunks)


def safety_number(own: tuple[str, bytes], peer: tuple[str, bytes]) -> str:
    """The 60-digit number two users compare to know they see each other's account keys.

    ``own`` and ``peer`` are (``tenant/user``, account key). Both sides compute the same
    number (the halves are sorted); printed in 12 groups of 5 digits.
    """
    halves = sorted(_digits(_fingerprint(name, key)) for name, key in (own, peer))
    joined = "".join(halves)
    return " ".join(joined[i : i + 5] for i in range(0, 60, 5))


class Accounts:
    """This device's view of accounts: its own account key and pinned peers (TOFU)."""

    def __init__(
        self, state: DeviceState, *, on_new_device: NewDeviceCallback | None = None
    ) -> None:
        self._state = state
        self._on_new_device = on_new_device

    def own_private(self) -> bytes:
        """The private account key of this device's user (FailedPrecondition if none)."""
        key = self._state.account_key()
        if key is None:
            raise FailedPrecondition(
                f"{self._state.path} holds no account key: register with `relayctl init` or "
                "link this device with `relayctl link`"
            )
        return key

    def check(self, device_list: DeviceList) -> DeviceList:
        """Verify ``device_list`` and compare it with the pinned one; return it if it holds.

        Raises Unauthenticated for a list that is malformed, not validly signed, older
        than the pinned one, or (for this device's own user) not signed by the own
        account key; AccountKeyChanged for a peer whose key differs from the pinned
        one. Pins a peer met the first time; reports devices new since the last list.
        """
        tenant, user = device_list.tenant, device_list.user
        try:
            device_list.check_shape()
        except InvalidArgument as exc:
            raise Unauthenticated(
                f"the device list of {tenant}/{user} is malformed: {exc}"
            ) from exc
        if not device_list.verifies():
            raise Unauthenticated(
                f"the device list of {tenant}/{user} is not signed by its account key: the key "
                "directory may be tampering with it"
            )
        own = self._state.address()
        if own is not None and (own.tenant, own.user) == (tenant, user):
            mine = self._state.account_key()
            if mine is None or account_public(mine) != device_list.account_key:
                raise Unauthenticated(
                    f"the device list of this device's own user {tenant}/{user} is not signed "
                    "by the account key this device holds"
                )
        pinned = self._state.pinned_account(tenant, user)
        if pinned is not None:
            if pinned.account_key != device_list.account_key:
                raise AccountKeyChanged(
                    f"the account key of {tenant}/{user} changed (they reset their account, or "
                    f"someone else speaks for them): compare `relayctl safety-number {user}` "
                    f"(it shows the new key's number) with them, then accept it with "
                    f"`relayctl trust {user}`",
                    metadata={"tenant": tenant, "user": user},
                )
            if device_list.version < pinned.version:
                raise Unauthenticated(
                    f"the key directory served version {device_list.version} of the device "
                    f"list of {tenant}/{user}, older than version {pinned.version} seen before"
                )
            known = {(d.device, d.identity_key) for d in pinned.devices}
            for entry in device_list.devices:
                if (entry.device, entry.identity_key) not in known:
                    self._report(Address(tenant, user, entry.device))
        self._pin(device_list)
        return device_list

    def trust(self, device_list: DeviceList) -> None:
        """Accept ``device_list``'s account key for its user from now on (after a reset).

        The list must still be validly signed by that key.
        """
        if not device_list.verifies():
            raise Unauthenticated(
                f"the device list of {device_list.tenant}/{device_list.user} is not validly "
                "signed: nothing to trust"
            )
        self._pin(device_list)
        log.info("trusting the new account key of %s/%s", device_list.tenant, device_list.user)

    def pinned_key(self, tenant: str, user: str) -> bytes | None:
        """The account key pinned for ``user`` (None if never met)."""
        pinned = self._state.pinned_account(tenant, user)
        return None if pinned is None else pinned.account_key

    def _pin(self, device_list: DeviceList) -> None:
        self._state.pin_account(
            device_list.tenant,
            device_list.user,
            device_list.account_key,
            device_list.version,
            device_list.devices,
        )

    def _report(self, device: Address) -> None:
        log.info("new device in the signed list of %s/%s: %s", device.tenant, device.user, device)
        if self._on_new_device is not None:
            self._on_new_device(device)
