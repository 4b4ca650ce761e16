"""The seam for end-to-end encryption.

:class:`~relay.sdk.client.RelayClient` calls ``seal`` once per envelope before its first
send attempt (retries reuse the sealed bytes, so a stateful cipher advances once per
message) and ``open`` once per message id received (duplicates are dropped before
``open``), before the opened content is stored in the local inbox. The relay only ever
sees what ``seal`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relay.model import Address


class Codec(Protocol):
    """Turns application plaintext into envelope content and back."""

    def seal(self, recipient: Address, plaintext: bytes) -> bytes:
        """Envelope content carrying ``plaintext`` to ``recipient``."""
        ...

    async def prepare(self, messages: Sequence[tuple[Address, bytes]]) -> None:
        """Called on the event loop with (sender, content) pairs before they are opened.

        A codec fetches here what :meth:`open` needs from the network (e.g. identity keys).
        """
        ...

    def open(self, sender: Address, content: bytes) -> bytes:
        """The plaintext of envelope ``content`` from ``sender``.

        Raise a :class:`~relay.sdk.crypto.errors.CryptoError` if it is not valid: the
        client then logs it (without content), counts it and drops it.
        """
        ...


class PlaintextCodec:
    """No encryption: content is the plaintext (tests and load generation only)."""

    def seal(self, recipient: Address, plaintext: bytes) -> bytes:
        """Return ``plaintext`` unchanged."""
        return plaintext

    async def prepare(self, messages: Sequence[tuple[Address, bytes]]) -> None:
        """Nothing to prepare."""

    def open(self, sender: Address, content: bytes) -> bytes:
        """Return ``content`` unchanged."""
        return content
