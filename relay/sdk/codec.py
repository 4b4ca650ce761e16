"""The seam for end-to-end encryption.

:class:`~relay.sdk.client.RelayClient` calls ``seal`` once per envelope before its first
send attempt (retries reuse the sealed bytes, so a stateful cipher advances once per
message) and ``open`` once per message id received (duplicates are dropped before
``open``), before the opened content is stored in the local inbox. The relay only ever
sees what ``seal`` returns.
"""

from __future__ import annotations

from typing import Protocol

from relay.model import Address


class Codec(Protocol):
    """Turns application plaintext into envelope content and back."""

    def seal(self, recipient: Address, plaintext: bytes) -> bytes:
        """Envelope content carrying ``plaintext`` to ``recipient``."""
        ...

    def open(self, sender: Address, content: bytes) -> bytes:
        """The plaintext of envelope ``content`` from ``sender``; raise if it is not valid."""
        ...


class PlaintextCodec:
    """No encryption: content is the plaintext. The default until PQXDH lands."""

    def seal(self, recipient: Address, plaintext: bytes) -> bytes:
        """Return ``plaintext`` unchanged."""
        return plaintext

    def open(self, sender: Address, content: bytes) -> bytes:
        """Return ``content`` unchanged."""
        return content
