"""Helpers of the end-to-end tests: provisioned devices and reading decrypted messages."""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path

from relay.model import Address
from relay.sdk import DeviceState
from relay.sdk.secure import SecureClient, SecureMessage
from tests.sdk.helpers import add_device

WAIT = 20.0


async def provision(keys_address: str, home: Path, user: str) -> DeviceState:
    """A new registered device of ``user`` (tenant "default"), its state open."""
    state = DeviceState.open(home)
    await add_device(keys_address, state, user, one_time_prekeys=5)
    return state


def address(state: DeviceState) -> Address:
    own = state.address()
    assert own is not None
    return own


async def take(client: SecureClient, count: int) -> list[SecureMessage]:
    """The next ``count`` messages of ``client``, each acknowledged."""
    out: list[SecureMessage] = []
    if count == 0:
        return out
    messages = client.messages()
    try:
        async with asyncio.timeout(WAIT):
            async for message in messages:
                out.append(message)
                await client.ack(message)
                if len(out) == count:
                    break
    finally:
        await messages.aclose()
    return out


#: Every plaintext of the no-plaintext-on-the-server tests starts with this marker, so
#: one search for it over large files (Cassandra commit logs) covers them all.
MARKER = b"PLAINTEXT-CANARY-"


def canaries(count: int) -> list[bytes]:
    """``count`` known random plaintexts, each starting with MARKER."""
    return [MARKER + secrets.token_hex(16).encode() for _ in range(count)]


def forms(plaintext: bytes) -> list[bytes]:
    """The ways a plaintext could show up in a file or log: raw, hex, base64, repr."""
    return [
        plaintext,
        plaintext.hex().encode(),
        base64.b64encode(plaintext),
        repr(plaintext).encode(),
    ]


def hits(blob: bytes, plaintexts: list[bytes]) -> list[bytes]:
    """The plaintexts (any form) or the marker (raw or hex) found in ``blob``."""
    found = [MARKER] if MARKER in blob or MARKER.hex().encode() in blob else []
    return found + [p for p in plaintexts if any(f in blob for f in forms(p))]


def scan_files(root: Path, plaintexts: list[bytes]) -> dict[str, list[bytes]]:
    """Every file under ``root`` that holds a plaintext (or the marker)."""
    found: dict[str, list[bytes]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        if h := hits(blob, plaintexts):
            found[str(path)] = h
    return found


def record_seals(client: SecureClient) -> list[bytes]:
    """Make ``client`` remember every envelope content it seals (the ciphertexts)."""
    sealed: list[bytes] = []
    real_seal = client.codec.seal

    def seal(recipient: Address, plaintext: bytes) -> bytes:
        content = real_seal(recipient, plaintext)
        sealed.append(content)
        return content

    client.codec.seal = seal  # type: ignore[method-assign]
    return sealed


def found_ciphertext(ciphertext: bytes, blob: bytes) -> bool:
    """Whether ``blob`` holds a 16-byte slice of ``ciphertext`` (at 1/4, 1/2 or 3/4).

    Several probes, because a store may split a long value across pages.
    """
    n = len(ciphertext)
    return any(ciphertext[i : i + 16] in blob for i in (n // 4, n // 2, 3 * n // 4))


def read_tree(root: Path) -> bytes:
    """Every file under ``root`` (or the file ``root``), concatenated."""
    if root.is_file():
        return root.read_bytes()
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())
