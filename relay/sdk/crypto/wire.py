"""Length-prefixed fields, the same convention as :mod:`relay.authproof`.

Each field is a 4-byte big-endian length followed by the bytes, so concatenations are
unambiguous; :class:`Reader` parses strictly and rejects trailing bytes.
"""

from __future__ import annotations

import struct

from relay.sdk.crypto.errors import MalformedMessage


def field(data: bytes) -> bytes:
    """Length-prefix one field."""
    return struct.pack(">I", len(data)) + data


def u32(value: int) -> bytes:
    """A 4-byte big-endian unsigned integer."""
    return struct.pack(">I", value)


class Reader:
    """Strict sequential parser of :func:`field` / :func:`u32` encodings."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, length: int) -> bytes:
        """The next ``length`` raw bytes."""
        end = self._pos + length
        if end > len(self._data):
            raise MalformedMessage(f"{self._what}: truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u32(self) -> int:
        """The next 4-byte big-endian integer."""
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def field(self, length: int | None = None) -> bytes:
        """The next length-prefixed field, checking its length if one is given."""
        data = self.take(self.u32())
        if length is not None and len(data) != length:
            raise MalformedMessage(f"{self._what}: field of {len(data)} bytes, want {length}")
        return data

    def rest(self) -> bytes:
        """Every byte not read yet (consumed)."""
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        """Raise unless every byte was consumed."""
        if self._pos != len(self._data):
            raise MalformedMessage(f"{self._what}: {len(self._data) - self._pos} trailing bytes")
