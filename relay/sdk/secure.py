"""SecureClient: end-to-end encrypted messaging between users, over every device (Sesame).

A message to a user is sealed separately for each of that user's devices and for the
sender's own other devices (so they see what was sent), and goes to the relay as one
SendBatch that claims to cover both users' whole device lists. If a list is out of date
the relay refuses the envelopes to that user and says which devices are missing, extra
or stale; the client fetches prekey bundles for the missing and stale ones, forgets the
extra ones, and sends again, by itself.

Typical use::

    async with SecureClient(state, "127.0.0.1:50051", "127.0.0.1:50052") as client:
        await client.send("bob", b"hello")
        async for message in client.messages():
            print(message.sender, message.body)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from relay.accounts import DeviceList
from relay.errors import FailedPrecondition, NotFound, RelayError, Unauthenticated
from relay.model import Address, DeviceListMismatch, Outcome
from relay.sdk.accounts import AccountKeyChanged, Accounts, NewDeviceCallback
from relay.sdk.backoff import Backoff
from relay.sdk.channels import endpoint, open_channel
from relay.sdk.client import RelayClient
from relay.sdk.crypto.errors import CryptoError, MalformedMessage
from relay.sdk.crypto.wire import Reader, field
from relay.sdk.device import replenish_prekeys
from relay.sdk.directory import KeyDirectoryClient, to_pb
from relay.sdk.e2ee import E2eeCodec
from relay.sdk.keys import new_message_id
from relay.sdk.state import DeviceState, ReceivedMessage
from relay.sdk.status import Endpoint
from relaypb.relay.v1 import relay_pb2

log = logging.getLogger(__name__)

#: Send attempts of one message while device lists keep changing.
MAX_SEND_ATTEMPTS = 4
_VERSION = 2
#: Plaintexts are padded with zeros to a multiple of this many bytes.
PAD_BLOCK = 128
_TO_YOU = 0
_SENT_BY_ME = 1


@dataclass(frozen=True, slots=True)
class SecureMessage:
    """A decrypted message.

    ``peer`` is the other user of the conversation. ``outgoing`` is True for a copy of
    a message another device of this user sent to ``peer`` (``sender`` is that device).
    """

    sender: Address
    peer: str
    outgoing: bool
    body: bytes
    message_id: bytes
    server_timestamp_ms: int
    #: The underlying inbox entry (pass to SecureClient.ack).
    received: ReceivedMessage


@dataclass(frozen=True, slots=True)
class SecureReceipt:
    """The outcome of one :meth:`SecureClient.send`: every device that got a copy."""

    message_id: bytes
    devices: tuple[Address, ...]
    #: Send attempts made (more than one when device lists were out of date).
    attempts: int


def encode_plaintext(body: bytes, sent_to: str | None = None) -> bytes:
    """The plaintext inside every ratchet message (see docs/protocol.md).

    ``version || kind || [field(peer user)] || field(body) || zeros``, padded to a
    multiple of PAD_BLOCK bytes so that envelope sizes say little about message lengths.
    """
    if sent_to is None:
        head = bytes([_VERSION, _TO_YOU])
    else:
        head = bytes([_VERSION, _SENT_BY_ME]) + field(sent_to.encode())
    framed = head + field(body)
    return framed + bytes(-len(framed) % PAD_BLOCK)


def decode_plaintext(plaintext: bytes) -> tuple[str | None, bytes]:
    """``(sent_to, body)``: ``sent_to`` is None for a message to this user."""
    if len(plaintext) < 2 or plaintext[0] != _VERSION:
        raise MalformedMessage("message plaintext: unknown version")
    reader = Reader(plaintext[2:], "message plaintext")
    if plaintext[1] == _TO_YOU:
        sent_to = None
    elif plaintext[1] == _SENT_BY_ME:
        sent_to = reader.field().decode("utf-8", errors="replace")
    else:
        raise MalformedMessage("message plaintext: unknown kind")
    body = reader.field()
    if any(reader.rest()):
        raise MalformedMessage("message plaintext: padding is not zero")
    return sent_to, body


class SecureClient:
    """An end-to-end encrypted session of the registered device in ``state``.

    ``relay`` is a relay target (or list) as for :class:`RelayClient`; ``keys`` the key
    directory's ``host:port`` (or a channel the caller owns). The channels it makes to
    both use TLS verified with the CA in ``tls_ca`` unless they are plain loopback (see
    :mod:`relay.sdk.channels`; ``tls`` forces it either way). On entry the client tops
    up this device's prekeys if the directory says they run low, and again whenever
    a received prekey message used some.
    """

    def __init__(
        self,
        state: DeviceState,
        relay: str | Sequence[str] | grpc.aio.Channel,
        keys: str | grpc.aio.Channel,
        *,
        receive: bool = True,
        backoff: Backoff | None = None,
        on_new_device: NewDeviceCallback | None = None,
        tls_ca: str = "",
        tls: bool | None = None,
    ) -> None:
        identity, address = state.identity(), state.address()
        if identity is None or address is None:
            raise RuntimeError(f"{state.path} holds no registered device")
        #: Signed device lists, checked against pinned account keys (trust on first use).
        self.accounts = Accounts(state, on_new_device=on_new_device)
        self.address = address
        self._identity = identity
        self._state = state
        self._own_keys_channel = isinstance(keys, str)
        if isinstance(keys, str):
            self._keys_channel = open_channel(keys, tls_ca=tls_ca, tls=tls)
            where = endpoint("key directory", keys, tls_ca=tls_ca, tls=tls)
        else:
            self._keys_channel, where = keys, Endpoint("key directory")
        self.directory = KeyDirectoryClient(self._keys_channel, target=where)
        self.directory.sign_as(identity, address)
        self._replenish = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.codec = E2eeCodec(
            state, identity, self._identity_key, on_prekeys_used=self._prekeys_used
        )
        self.relay = RelayClient(
            state, relay, receive=receive, codec=self.codec, backoff=backoff, tls_ca=tls_ca, tls=tls
        )
        self._replenisher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SecureClient:
        self._loop = asyncio.get_running_loop()
        try:
            await replenish_prekeys(self._state, self.directory)
            await self.relay.__aenter__()
        except BaseException:
            await self._close_channel()
            raise
        self._replenisher = asyncio.create_task(self._replenish_loop(), name="prekey replenish")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._replenisher is not None:
            self._replenisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replenisher
        await self.relay.close()
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._own_keys_channel:
            await self._keys_channel.close()

    # -- prekeys --------------------------------------------------------------------------

    def _prekeys_used(self) -> None:  # called from the thread that opened the message
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._replenish.set)

    async def _replenish_loop(self) -> None:
        while True:
            await self._replenish.wait()
            self._replenish.clear()
            try:
                await replenish_prekeys(self._state, self.directory)
            except RelayError as exc:  # retried at the next prekey message or start
                log.warning("could not replenish prekeys: %s", exc.message)

    async def _identity_key(self, device: Address) -> bytes | None:
        """The identity key of ``device`` as its user's verified, signed list names it."""
        try:
            device_list = await self.verified_list(device.tenant, device.user)
        except NotFound:
            return None
        except AccountKeyChanged:
            self.codec.hold(device)  # its messages wait for `trust`, unopened and unacked
            return None
        except Unauthenticated as exc:  # a forged or rolled-back list: nothing to trust
            log.warning("no identity for %s: %s", device, exc.message)
            return None
        entry = device_list.find(device.device)
        return None if entry is None else entry.identity_key

    async def verified_list(self, tenant: str, user: str) -> DeviceList:
        """The signed device list of ``user``, verified and checked against the pinned key.

        Raises AccountKeyChanged if the user's account key is not the pinned one, and
        Unauthenticated if the list is not validly signed (see relay.sdk.accounts).
        """
        return self.accounts.check(await self.directory.device_list(tenant, user))

    async def trust(self, user: str) -> DeviceList:
        """Accept ``user``'s current account key (after they reset their account)."""
        device_list = await self.directory.device_list(self.address.tenant, user)
        self.accounts.trust(device_list)
        return device_list

    # -- sending ------------------------------------------------------------------------

    async def send(
        self, user: str, body: bytes, *, message_id: bytes | None = None
    ) -> SecureReceipt:
        """Encrypt ``body`` for every device of ``user`` (and this user's other devices).

        Returns once the relay has accepted every copy. Raises NotFound if ``user`` has
        no registered device, the relay.errors exception of a rejected copy, or
        FailedPrecondition if device lists kept changing over MAX_SEND_ATTEMPTS tries.
        """
        tenant = self.address.tenant
        mid = message_id or new_message_id()
        own = (tenant, self.address.user)
        pending = {(tenant, user), own}
        delivered: list[Address] = []
        await self._ensure_sessions(tenant, user)
        for attempt in range(1, MAX_SEND_ATTEMPTS + 1):
            envelopes = await asyncio.to_thread(self._seal_for, pending, user, body, mid)
            result = await self.relay.send_batch(envelopes, sorted(pending))
            refused = {(m.tenant, m.user): m for m in result.mismatches}
            for receipt in result.receipts:
                key = (receipt.recipient.tenant, receipt.recipient.user)
                if key in refused:
                    continue
                if receipt.outcome is Outcome.REJECTED:
                    receipt.raise_for_error()
                delivered.append(receipt.recipient)
            if not refused:
                if not any(d.user == user for d in delivered) and user != self.address.user:
                    raise NotFound(
                        f"unknown user {user!r} in tenant {tenant!r} (no registered devices)"
                    )
                return SecureReceipt(mid, tuple(delivered), attempt)
            for mismatch in refused.values():
                await self._repair(mismatch)
            pending = set(refused)
        raise FailedPrecondition(
            f"the device list of {user!r} kept changing over {MAX_SEND_ATTEMPTS} attempts"
        )

    def _seal_for(
        self, users: set[tuple[str, str]], user: str, body: bytes, mid: bytes
    ) -> list[relay_pb2.Envelope]:
        envelopes = []
        with self._state.transaction():  # every ratchet step commits before anything is sent
            for tenant, name in sorted(users):
                plaintext = encode_plaintext(body, user if name == self.address.user else None)
                for peer in self._state.session_peers(tenant, name):
                    if peer == self.address:
                        continue
                    envelopes.append(
                        relay_pb2.Envelope(
                            message_id=mid,
                            recipient=to_pb(peer),
                            content=self.codec.seal(peer, plaintext),
                            recipient_registration_id=self.codec.peer_registration_id(peer),
                        )
                    )
        return envelopes

    async def _ensure_sessions(self, tenant: str, user: str) -> None:
        """Start sessions with every device of a user we have never talked to."""
        if user == self.address.user or self._state.session_peers(tenant, user):
            return
        await self._start_sessions(tenant, user, ())

    async def _start_sessions(self, tenant: str, user: str, devices: Sequence[int]) -> None:
        """Start sessions with devices of ``user`` that its signed list names (all if empty).

        Only a device in the user's verified list, with the identity key the list gives
        it, gets a session: a device the key directory added on its own gets nothing.
        """
        device_list = await self.verified_list(tenant, user)
        listed = {d.device: d.identity_key for d in device_list.devices}
        wanted = [d for d in devices if d in listed] if devices else []
        if devices and not wanted:
            return
        bundles = await self.directory.fetch_bundles(tenant, user, wanted)
        for bundle in bundles:
            if bundle.address == self.address:
                continue
            if listed.get(bundle.address.device) != bundle.bundle.identity.signing_key:
                log.warning(
                    "no session with %s: it is not in the signed device list of %s/%s",
                    bundle.address,
                    tenant,
                    user,
                )
                continue
            try:
                await asyncio.to_thread(self.codec.start_session, bundle)
            except CryptoError as exc:
                log.warning("no session with %s: %s", bundle.address, exc.message)

    async def _repair(self, mismatch: DeviceListMismatch) -> None:
        """Bring our sessions with one user in line with the relay's device list."""
        tenant, user = mismatch.tenant, mismatch.user
        gone = [Address(tenant, user, d) for d in (*mismatch.extra, *mismatch.stale)]
        if gone:
            await asyncio.to_thread(self.codec.forget, gone)
        fetch = [
            d
            for d in (*mismatch.missing, *mismatch.stale)
            if Address(tenant, user, d) != self.address
        ]
        if fetch:
            await self._start_sessions(tenant, user, fetch)
        log.info(
            "device list of %s/%s updated: +%s -%s stale %s",
            tenant,
            user,
            list(mismatch.missing),
            list(mismatch.extra),
            list(mismatch.stale),
        )

    # -- receiving ----------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[SecureMessage]:
        """Decrypted messages in arrival order, each once (see RelayClient.messages)."""
        async for received in self.relay.messages():
            try:
                sent_to, body = decode_plaintext(received.content)
            except MalformedMessage as exc:
                log.warning("dropped message %s: %s", received.message_id.hex(), exc.message)
                continue
            outgoing = sent_to is not None and received.sender.user == self.address.user
            yield SecureMessage(
                sender=received.sender,
                peer=sent_to if outgoing and sent_to is not None else received.sender.user,
                outgoing=outgoing,
                body=body,
                message_id=received.message_id,
                server_timestamp_ms=received.server_timestamp_ms,
                received=received,
            )

    async def ack(self, *messages: SecureMessage) -> None:
        """Acknowledge messages (see RelayClient.ack)."""
        await self.relay.ack(*(m.received for m in messages))

    async def wait_queue_empty(self) -> None:
        """Wait until every message stored for this device is in the local inbox."""
        await self.relay.wait_queue_empty()
