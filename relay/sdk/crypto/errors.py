"""Errors of the end-to-end encryption core, under the relay's one error tree.

::

    RelayError
    └── CryptoError                 a key, signature or message failed a check
        ├── BadSignature            a signature over a named key does not verify
        ├── UnknownPrekey           the initial message names a prekey we do not hold
        ├── MalformedMessage        wrong length, type byte or version
        ├── DecryptError            authentication failed: tampered, forged or wrong key
        ├── DuplicateMessage        this message key was already used (replay)
        ├── TooManySkipped          the message would skip more keys than allowed
        └── AwaitingTrust           the sender's account key changed: kept, not opened

None of them is retryable: the same bytes fail the same way.
"""

from __future__ import annotations

from relay.errors import RelayError


class CryptoError(RelayError):
    """A cryptographic check failed; the message says which one."""

    reason = "CRYPTO"


class BadSignature(CryptoError):
    """A signature does not verify; ``key`` names the key it should vouch for."""

    reason = "BAD_SIGNATURE"

    def __init__(self, key: str) -> None:
        super().__init__(f"bad signature on the {key}", metadata={"key": key})
        self.key = key


class UnknownPrekey(CryptoError):
    """The initial message uses a prekey this device does not hold (or already used)."""

    reason = "UNKNOWN_PREKEY"


class MalformedMessage(CryptoError):
    """Bytes that do not parse as the expected structure."""

    reason = "MALFORMED_MESSAGE"


class DecryptError(CryptoError):
    """Authenticated decryption failed."""

    reason = "DECRYPT_FAILED"


class DuplicateMessage(CryptoError):
    """The message key for this header was already used: a duplicate or replay."""

    reason = "DUPLICATE_MESSAGE"


class TooManySkipped(CryptoError):
    """Accepting the message would derive more skipped message keys than allowed."""

    reason = "TOO_MANY_SKIPPED"


class AwaitingTrust(CryptoError):
    """The sender's user has a new account key that this device has not accepted yet.

    The message is neither opened nor acknowledged: it stays queued on the relay and is
    opened on a later session, once the new key is trusted (``relayctl trust USER``).
    """

    reason = "AWAITING_TRUST"
