"""The end-to-end encryption codec: PQXDH + Double Ratchet sessions per peer device.

Envelope content (see docs/protocol.md):

* ``0x01 || field(PQXDH initial message) || ratchet message``: a *prekey message*,
  sent by the initiator of a session until the peer has answered on it;
* ``0x02 || ratchet message``: every other message.

As in Sesame, a device keeps up to :data:`MAX_SESSIONS_PER_DEVICE` sessions with each
peer device, the first one *active* (used to send). A message is tried against each
session; the one that decrypts it becomes active. Two devices that start sessions
with each other at the same time therefore converge on one session, and nothing is
lost. Session state (skipped message keys included) lives in the device's state file
and is written in the caller's transaction, together with the message it decrypted.

The codec never logs keys or contents.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.model import Address, registration_id
from relay.sdk.crypto import pqxdh
from relay.sdk.crypto.bundle import InitialMessage
from relay.sdk.crypto.errors import (
    AwaitingTrust,
    CryptoError,
    DuplicateMessage,
    MalformedMessage,
)
from relay.sdk.crypto.ratchet import Ratchet
from relay.sdk.crypto.wire import Reader, field
from relay.sdk.directory import DeviceBundle
from relay.sdk.keys import Identity
from relay.sdk.state import DeviceState

log = logging.getLogger(__name__)

PREKEY_MESSAGE = 0x01
RATCHET_MESSAGE = 0x02
#: Sessions kept per peer device (the active one first).
MAX_SESSIONS_PER_DEVICE = 5
RECORD_VERSION = 1

#: Looks up a device's Ed25519 identity key in the key directory (None: not registered).
IdentityLookup = Callable[[Address], Awaitable[bytes | None]]


class NoSession(CryptoError):
    """There is no session with the device: fetch its prekey bundle first."""

    reason = "NO_SESSION"


class UntrustedIdentity(CryptoError):
    """A prekey message's identity key is not the one the key directory holds."""

    reason = "UNTRUSTED_IDENTITY"


@dataclass(slots=True)
class _Session:
    ratchet: Ratchet
    #: The peer's Ed25519 identity key.
    identity_key: bytes
    #: SHA-256 of the initial message this (responder) session was made from.
    initial_id: bytes | None = None
    #: Initiator: the initial message to prefix until the peer answers.
    pending_initial: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        def b64(value: bytes | None) -> str | None:
            return None if value is None else base64.b64encode(value).decode()

        return {
            "ratchet": b64(self.ratchet.to_bytes()),
            "identity_key": b64(self.identity_key),
            "initial_id": b64(self.initial_id),
            "pending_initial": b64(self.pending_initial),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> _Session:
        def raw(key: str) -> bytes | None:
            value = doc[key]
            return None if value is None else base64.b64decode(value)

        ratchet, identity = raw("ratchet"), raw("identity_key")
        if ratchet is None or identity is None:
            raise MalformedMessage("session record lacks its ratchet or identity key")
        return cls(Ratchet.from_bytes(ratchet), identity, raw("initial_id"), raw("pending_initial"))


def _encode(sessions: Sequence[_Session]) -> bytes:
    doc = {"version": RECORD_VERSION, "sessions": [s.to_json() for s in sessions]}
    return json.dumps(doc, separators=(",", ":")).encode()


def _decode(record: bytes) -> list[_Session]:
    try:
        doc = json.loads(record)
        if doc["version"] != RECORD_VERSION:
            raise MalformedMessage(f"session record version {doc['version']!r}")
        return [_Session.from_json(s) for s in doc["sessions"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage("session record does not parse") from exc


class E2eeCodec:
    """Seals for and opens from peer devices; a :class:`~relay.sdk.codec.Codec`.

    ``lookup`` checks the identity in a prekey message against the key directory
    (:meth:`prepare` runs it, on the event loop, before :meth:`open` runs off it).
    ``on_prekeys_used`` is called (from the thread that opened the message) whenever a
    prekey message consumed this device's one-time prekeys.
    """

    def __init__(
        self,
        state: DeviceState,
        identity: Identity,
        lookup: IdentityLookup,
        *,
        on_prekeys_used: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self._identity = identity
        self._lookup = lookup
        self._on_prekeys_used = on_prekeys_used
        #: Identity keys the directory vouched for, by sender (filled by prepare).
        self._vouched: dict[Address, bytes] = {}
        #: Senders whose user's account key changed and is not trusted yet (see hold).
        self._held: set[Address] = set()

    def hold(self, sender: Address) -> None:
        """Keep prekey messages of ``sender`` unopened: its account key awaits trust."""
        self._held.add(sender)

    # -- sessions -----------------------------------------------------------------------

    def _load(self, peer: Address) -> list[_Session]:
        record = self._state.session_record(peer)
        return [] if record is None else _decode(record)

    def _save(self, peer: Address, sessions: list[_Session]) -> None:
        self._state.save_session_record(peer, _encode(sessions[:MAX_SESSIONS_PER_DEVICE]))

    def peer_registration_id(self, peer: Address) -> int:
        """The registration id of ``peer`` as the active session knows it."""
        sessions = self._load(peer)
        if not sessions:
            raise NoSession(f"no session with {peer}")
        return registration_id(sessions[0].identity_key)

    def start_session(self, device: DeviceBundle) -> None:
        """Start a session with ``device`` (PQXDH as initiator); it becomes active.

        Raises :class:`~relay.sdk.crypto.errors.BadSignature` naming a bad key.
        """
        bundle = device.bundle
        initiation = pqxdh.initiate(self._identity, bundle)
        ratchet = Ratchet.initiator(
            initiation.shared_secret, initiation.associated_data, bundle.signed_prekey.public
        )
        session = _Session(
            ratchet, bundle.identity.signing_key, pending_initial=initiation.message.to_bytes()
        )
        with self._state.transaction():
            self._save(device.address, [session, *self._load(device.address)])

    def forget(self, peers: Sequence[Address]) -> None:
        """Drop every session with ``peers`` (removed or re-registered devices)."""
        self._state.delete_session_records(peers)

    # -- the Codec protocol -------------------------------------------------------------

    def seal(self, recipient: Address, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` on the active session with ``recipient``; state is saved.

        Call inside :meth:`DeviceState.transaction` when sealing for several devices so
        that all their states commit at once. Raises :class:`NoSession`.
        """
        with self._state.transaction():
            sessions = self._load(recipient)
            if not sessions:
                raise NoSession(f"no session with {recipient}: fetch its prekey bundle first")
            active = sessions[0]
            message = active.ratchet.encrypt(plaintext)
            self._save(recipient, sessions)
        if active.pending_initial is not None:
            return bytes([PREKEY_MESSAGE]) + field(active.pending_initial) + message
        return bytes([RATCHET_MESSAGE]) + message

    async def prepare(self, messages: Sequence[tuple[Address, bytes]]) -> None:
        """Look up the senders of prekey messages in the key directory (on the loop)."""
        for sender, content in messages:
            if content[:1] == bytes([PREKEY_MESSAGE]) and sender not in self._vouched:
                self._held.discard(sender)
                key = await self._lookup(sender)
                if key is not None:
                    self._vouched[sender] = key

    def open(self, sender: Address, content: bytes) -> bytes:
        """Decrypt ``content`` from ``sender``; raise a CryptoError if it does not.

        A rejected message changes no state. Call inside the transaction that stores
        the plaintext (RelayClient does).
        """
        if not content:
            raise MalformedMessage("empty envelope content")
        kind, body = content[0], content[1:]
        with self._state.transaction():
            if kind == RATCHET_MESSAGE:
                return self._open_ratchet(sender, body)
            if kind == PREKEY_MESSAGE:
                return self._open_prekey(sender, body)
        raise MalformedMessage(f"unknown message type {kind}")

    def _open_ratchet(self, sender: Address, message: bytes) -> bytes:
        sessions = self._load(sender)
        if not sessions:
            raise NoSession(f"a message from {sender}, with whom there is no session")
        return self._try_sessions(sender, sessions, message)

    def _try_sessions(self, sender: Address, sessions: list[_Session], message: bytes) -> bytes:
        error: CryptoError | None = None
        for i, session in enumerate(sessions):
            try:
                plaintext = session.ratchet.decrypt(message)
            except CryptoError as exc:
                if error is None or isinstance(exc, DuplicateMessage):
                    error = exc
                continue
            session.pending_initial = None  # the peer has this session: answered on it
            self._save(sender, [session, *sessions[:i], *sessions[i + 1 :]])
            return plaintext
        assert error is not None
        raise error

    def _open_prekey(self, sender: Address, body: bytes) -> bytes:
        reader = Reader(body, "prekey message")
        initial_bytes = reader.field()
        message = body[4 + len(initial_bytes) :]
        initial = InitialMessage.from_bytes(initial_bytes)
        initial_id = hashlib.sha256(initial_bytes).digest()
        sessions = self._load(sender)
        known = [s for s in sessions if s.initial_id == initial_id]
        if known:  # the initiator resends its header until we answer: same session
            return self._try_sessions(sender, sessions, message)
        vouched = self._vouched.get(sender)
        if vouched is None and sender in self._held:
            raise AwaitingTrust(
                f"a message from {sender}, whose account key changed: it is kept until the new "
                f"key is trusted (`relayctl trust {sender.user}`)"
            )
        if vouched is None or vouched != initial.identity.signing_key:
            self._vouched.pop(sender, None)  # look it up again next time
            raise UntrustedIdentity(
                f"the identity key in a prekey message from {sender} is not the one the "
                "key directory holds for that device"
            )
        prekeys = self._state.device_prekeys()
        if prekeys is None:
            raise NoSession("this device holds no prekeys")
        shared, ad = pqxdh.respond(prekeys, initial)
        ratchet = Ratchet.responder(shared, ad, prekeys.signed_private(initial.signed_prekey_id))
        plaintext = ratchet.decrypt(message)
        # Only now, with the first message authentic, are the one-time keys burnt.
        prekeys.consume(initial.pq_prekey_id, initial.one_time_prekey_id)
        self._state.save_device_prekeys(prekeys)
        session = _Session(ratchet, initial.identity.signing_key, initial_id=initial_id)
        self._save(sender, [session, *sessions])
        if self._on_prekeys_used is not None:
            self._on_prekeys_used()
        return plaintext
