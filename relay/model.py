"""Domain values shared by the relay core, its stores and the SDK. No I/O here."""

from __future__ import annotations

import enum
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from relay.errors import InvalidArgument

MESSAGE_ID_BYTES = 16
#: Matched whole (``fullmatch``: ``$`` would let a trailing newline through).
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_MAX_USER_CHARS = 128
MAX_DEVICE = 2**31 - 1
#: User ids with this prefix are service senders (device 0), never device users.
SERVICE_PREFIX = "service:"
#: Unicode categories refused anywhere in a user id: control, format (zero-width,
#: bidirectional overrides), line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})

_REGISTRATION_ID_LABEL = b"e2ee-relay/registration-id/v1"


def registration_id(identity_key: bytes) -> int:
    """The registration id of a device with Ed25519 ``identity_key``: 1..2**31-1.

    Derived (SHA-256 of a label and the key), so the key directory, the relay and the
    SDK agree without storing it. A device that registers again gets a new identity key
    and so a new registration id: that is how a stale session is recognised.
    """
    digest = hashlib.sha256(_REGISTRATION_ID_LABEL + identity_key).digest()
    return (int.from_bytes(digest[:4], "big") & 0x7FFFFFFF) or 1


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A device of a user of a tenant. ``device == 0`` is a service sender, never a device."""

    tenant: str
    user: str
    device: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.user}/{self.device}"

    def validate(self, *, field: str = "address", allow_service: bool = False) -> Address:
        """Return self if well-formed, else raise InvalidArgument naming ``field`` and the rule.

        The tenant is 1-64 of ``[a-z0-9_-]`` starting with a letter or digit; the user
        passes :func:`validate_user`; the device is 1..MAX_DEVICE, or 0 too with
        ``allow_service`` (a service sender). A device user (device >= 1) may not use
        the reserved prefix ``service:``.
        """
        if not _TENANT_RE.fullmatch(self.tenant):
            raise InvalidArgument(
                f"{field}.tenant {self.tenant!r} is invalid: use 1-64 of [a-z0-9_-], "
                "starting with a letter or digit"
            )
        validate_user(self.user, field=f"{field}.user")
        low = 0 if allow_service else 1
        if not low <= self.device <= MAX_DEVICE:
            raise InvalidArgument(
                f"{field}.device {self.device} is out of range {low}..{MAX_DEVICE}"
            )
        if self.device >= 1 and self.user.startswith(SERVICE_PREFIX):
            raise InvalidArgument(
                f"{field}.user {self.user!r} is invalid for a device: the prefix "
                f"{SERVICE_PREFIX!r} is reserved for service senders"
            )
        return self


def validate_user(user: str, *, field: str = "user") -> str:
    """Return ``user`` if it is a well-formed user id, else raise InvalidArgument.

    Rules, each named in its error: 1-128 characters; no '/'; no leading or trailing
    whitespace; no control, format or line/paragraph separator characters (Unicode
    Cc, Cf, Zl, Zp) and nothing else that is not printable; in Unicode normal form
    NFC (so one name has one spelling).
    """
    if not user or len(user) > _MAX_USER_CHARS:
        shown = repr(user) if len(user) <= _MAX_USER_CHARS else f"{user[:32]!r}..."
        raise InvalidArgument(
            f"{field} {shown} is invalid: it has {len(user)} characters; use 1-{_MAX_USER_CHARS}"
        )
    if "/" in user:
        raise InvalidArgument(f"{field} {user!r} is invalid: it may not contain '/'")
    if user != user.strip():
        raise InvalidArgument(
            f"{field} {user!r} is invalid: it may not start or end with whitespace"
        )
    for ch in user:
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES:
            raise InvalidArgument(
                f"{field} {user!r} is invalid: it contains U+{ord(ch):04X}, a control or "
                f"format character (Unicode category {category})"
            )
    if not user.isprintable():
        raise InvalidArgument(
            f"{field} {user!r} is invalid: use printable characters only (no separators "
            "but the space, no unassigned, private-use or surrogate code points)"
        )
    if not unicodedata.is_normalized("NFC", user):
        raise InvalidArgument(
            f"{field} {user!r} is invalid: it is not in Unicode normal form NFC; send "
            "unicodedata.normalize('NFC', user)"
        )
    return user


class EnvelopeKey(NamedTuple):
    """What names one envelope within its recipient's queue: its sender and message id.

    Dedup and acks are keyed by it per recipient, never by ``message_id`` alone: message
    ids are chosen by senders, so a device that learns (or guesses) the id another sender
    will use could otherwise pre-claim it (that sender's envelope would answer DUPLICATE
    and never be stored) or have it deleted by an ack. ``sender`` is the authenticated
    sender, set by the relay core, never what a client wrote in the envelope.

    A named tuple, not a dataclass: it is made, hashed and compared several times per
    envelope on the hot path, and a tuple does all three in C.
    """

    sender: Address
    message_id: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opaque encrypted envelope as the relay sees it."""

    message_id: bytes
    sender: Address
    recipient: Address
    content: bytes
    ephemeral: bool = False
    ttl_seconds: int = 0
    server_timestamp_ms: int = 0

    @property
    def size(self) -> int:
        """Bytes the envelope costs in a device queue (content plus fixed overhead)."""
        return len(self.content) + 64

    @property
    def key(self) -> EnvelopeKey:
        """The envelope's dedup and ack key in its recipient's queue: (sender, message_id)."""
        return EnvelopeKey(self.sender, self.message_id)


@dataclass(frozen=True, slots=True)
class QueuedEnvelope:
    """An envelope in a device queue: ``seq`` orders the queue, ``expires_at_ms`` ends it."""

    seq: int
    envelope: Envelope
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class QueuePage:
    """One page of a device queue.

    ``items`` are in ascending ``seq``; ``cursor`` is the seq to pass as ``after`` to
    read the next page (the last item's seq, or the ``after`` that was asked if the
    page is empty); ``more`` says whether a next page may hold items.
    """

    items: tuple[QueuedEnvelope, ...]
    cursor: int
    more: bool


class Outcome(enum.Enum):
    """What happened to one envelope of a send (mirrors relay.v1.Outcome)."""

    STORED = 1
    DUPLICATE = 2
    DELIVERED = 3
    RECIPIENT_OFFLINE = 4
    REJECTED = 5


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Per-device queue bounds the store enforces atomically on append."""

    max_depth: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class Appended:
    """The store's answer for one envelope of an append.

    ``outcome`` is STORED, DUPLICATE or REJECTED; for REJECTED, ``limit`` names the
    queue limit that was full (``max_queue_depth`` or ``max_queue_bytes``).
    """

    outcome: Outcome
    seq: int = 0
    limit: str = ""


@dataclass(frozen=True, slots=True)
class Pushed:
    """An envelope handed to a session directly (live), with its place in the queue.

    ``seq`` is its queue seq (0 for ephemeral and direct envelopes); ``prev_seq`` the seq
    of the previous envelope stored from the same sender stream to the same recipient (0:
    unknown). ``direct``: not stored (yet); the sender waits for the recipient's ack (see
    ``relay.core.sendorder``).
    """

    envelope: Envelope
    seq: int = 0
    prev_seq: int = 0
    direct: bool = False
    #: Forwarded to another node, whose ack this node waits to see (``Notice``).
    report_ack: bool = False


@dataclass(frozen=True, slots=True)
class Offered:
    """An envelope pushed direct (not stored) to the session of ``epoch`` on another node.

    ``after_seq``: the stored envelope of its pair it must follow (``DirectWait.after_seq``);
    ``follows``: the direct one (``DirectWait.follows``).
    """

    envelope: Envelope
    epoch: int
    after_seq: int = 0
    follows: bytes = b""


@dataclass(frozen=True, slots=True)
class Notice:
    """A node's report on an envelope another node forwarded to one of its sessions.

    ``acked``: the recipient device acked it (else: a direct one that could not be
    delivered; its sender stores it). ``direct``: it was forwarded direct (an
    ``Offered``), else stored with ``Pushed.report_ack``.
    """

    recipient: Address
    sender: Address
    message_id: bytes
    acked: bool
    direct: bool


@dataclass(frozen=True, slots=True)
class Location:
    """Where a device's receiving session is: a node and the session's epoch."""

    node_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class DeviceListMismatch:
    """How a sender's view of a user's devices differs from the registered ones (Sesame).

    ``missing``: registered but not addressed; ``extra``: addressed but not registered;
    ``stale``: addressed with another registration id (the device registered again).
    """

    tenant: str
    user: str
    missing: tuple[int, ...] = ()
    extra: tuple[int, ...] = ()
    stale: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.stale)

    def describe(self) -> str:
        """A sentence a person can act on."""
        return (
            f"device list of {self.tenant}/{self.user} is out of date "
            f"(missing {list(self.missing)}, extra {list(self.extra)}, "
            f"stale {list(self.stale)}): fetch keys of the missing and stale devices, "
            "drop the extra ones and send again"
        )
