"""The Double Ratchet (Signal's specification, revision 1) over X25519 and AES-256-GCM.

* ``KDF_RK(rk, dh_out) = HKDF-SHA-256(salt=rk, IKM=dh_out, info=ROOT_INFO, L=64)``, split
  into the new root key and a chain key.
* ``KDF_CK(ck)``: message key ``HMAC-SHA-256(ck, 0x01)``, next chain key
  ``HMAC-SHA-256(ck, 0x02)``.
* A message is ``header || AES-256-GCM(key, nonce, plaintext, field(AD) || header)`` with
  ``key || nonce = HKDF-SHA-256(salt=0, IKM=mk, info=MESSAGE_INFO, L=44)``. A message key
  encrypts exactly one message, so the derived nonce is never reused.
* The header is ``DH public key (32) || PN (u32 BE) || N (u32 BE)``, authenticated by
  the AEAD as above.

Decryption works on a copy of the state and commits it only when the message
authenticates, so a rejected message (tampered, replayed, too far ahead) changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.errors import (
    CryptoError,
    DecryptError,
    DuplicateMessage,
    MalformedMessage,
    TooManySkipped,
)
from relay.sdk.crypto.wire import field

#: Most message keys one message may make us skip (per chain), as in the spec.
MAX_SKIP = 1000
#: Most skipped message keys kept in all; the oldest are dropped past this.
MAX_STORED_SKIPPED = 2000
ROOT_INFO = b"e2ee-relay/ratchet/root/v1"
MESSAGE_INFO = b"e2ee-relay/ratchet/message-key/v1"
HEADER_LEN = 40
TAG_LEN = 16
STATE_VERSION = 1

KeyGen = Callable[[], bytes]


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """``KDF_RK``: ``(new root key, chain key)``."""
    out = p.hkdf_sha256(dh_out, root_key, ROOT_INFO, 64)
    return out[:32], out[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """``KDF_CK``: ``(next chain key, message key)``."""
    return p.hmac_sha256(chain_key, b"\x02"), p.hmac_sha256(chain_key, b"\x01")


def _aead_keys(message_key: bytes) -> tuple[bytes, bytes]:
    out = p.hkdf_sha256(message_key, b"", MESSAGE_INFO, p.AEAD_KEY_LEN + p.AEAD_NONCE_LEN)
    return out[: p.AEAD_KEY_LEN], out[p.AEAD_KEY_LEN :]


def seal(message_key: bytes, plaintext: bytes, associated_data: bytes, header: bytes) -> bytes:
    """``header || ENCRYPT(mk, plaintext, field(AD) || header)``."""
    key, nonce = _aead_keys(message_key)
    return header + p.aead_encrypt(key, nonce, plaintext, field(associated_data) + header)


def unseal(message_key: bytes, message: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`~.errors.DecryptError` if not authentic."""
    key, nonce = _aead_keys(message_key)
    header = message[:HEADER_LEN]
    return p.aead_decrypt(key, nonce, message[HEADER_LEN:], field(associated_data) + header)


@dataclass(frozen=True, slots=True)
class Header:
    """The ratchet header: sender's ratchet public key, previous chain length, number."""

    dh: bytes
    pn: int
    n: int

    def encode(self) -> bytes:
        """The 40-byte wire form."""
        return self.dh + struct.pack(">II", self.pn, self.n)

    @classmethod
    def decode(cls, message: bytes) -> Header:
        """The header at the start of ``message`` (which must also hold a tag)."""
        if len(message) < HEADER_LEN + TAG_LEN:
            raise MalformedMessage(f"ratchet message of {len(message)} bytes is too short")
        pn, n = struct.unpack(">II", message[32:HEADER_LEN])
        return cls(message[:32], pn, n)


@dataclass(slots=True)
class _State:
    dhs: bytes
    dhr: bytes | None
    rk: bytes
    cks: bytes | None
    ckr: bytes | None
    ns: int
    nr: int
    pn: int
    ad: bytes
    skipped: dict[tuple[bytes, int], bytes]

    def copy(self) -> _State:
        return dataclasses.replace(self, skipped=dict(self.skipped))


class Ratchet:
    """One side of a Double Ratchet session. Not thread-safe; persist with :meth:`to_bytes`."""

    def __init__(self, state: _State, keygen: KeyGen = p.x25519_generate) -> None:
        self._state = state
        self._keygen = keygen

    @classmethod
    def initiator(
        cls,
        shared_secret: bytes,
        associated_data: bytes,
        responder_key: bytes,
        keygen: KeyGen = p.x25519_generate,
    ) -> Ratchet:
        """``RatchetInitAlice``: ``responder_key`` is Bob's signed prekey (public)."""
        dhs = keygen()
        rk, cks = kdf_rk(shared_secret, p.x25519(dhs, responder_key))
        state = _State(dhs, responder_key, rk, cks, None, 0, 0, 0, associated_data, {})
        return cls(state, keygen)

    @classmethod
    def responder(
        cls,
        shared_secret: bytes,
        associated_data: bytes,
        ratchet_private: bytes,
        keygen: KeyGen = p.x25519_generate,
    ) -> Ratchet:
        """``RatchetInitBob``: ``ratchet_private`` is the signed prekey Alice used."""
        state = _State(
            ratchet_private, None, shared_secret, None, None, 0, 0, 0, associated_data, {}
        )
        return cls(state, keygen)

    @property
    def skipped_count(self) -> int:
        """How many skipped message keys are stored."""
        return len(self._state.skipped)

    def encrypt(self, plaintext: bytes) -> bytes:
        """``RatchetEncrypt``: the message (header || ciphertext) carrying ``plaintext``."""
        s = self._state
        if s.cks is None:
            raise CryptoError("cannot send before the first message from the initiator")
        if s.ns >= 0xFFFFFFFF:
            raise CryptoError("sending chain exhausted")
        header = Header(p.x25519_public(s.dhs), s.pn, s.ns).encode()
        s.cks, mk = kdf_ck(s.cks)
        s.ns += 1
        return seal(mk, plaintext, s.ad, header)

    def decrypt(self, message: bytes) -> bytes:
        """``RatchetDecrypt``: the plaintext, or a :class:`~.errors.CryptoError`.

        The state changes only if the message authenticates; each message key is
        deleted when used, so a duplicate or replay raises :class:`DuplicateMessage`.
        """
        header = Header.decode(message)
        s = self._state.copy()
        mk = s.skipped.pop((header.dh, header.n), None)
        if mk is None:
            if header.dh == s.dhr and header.n < s.nr:
                raise DuplicateMessage(f"message {header.n} of this chain was already received")
            if header.dh != s.dhr:
                self._skip(s, header.pn)
                self._dh_ratchet(s, header)
            self._skip(s, header.n)
            if s.ckr is None:  # a message on our own initial key: nobody sends on it
                raise DecryptError("no receiving chain for this message")
            s.ckr, mk = kdf_ck(s.ckr)
            s.nr += 1
        plaintext = unseal(mk, message, s.ad)
        self._state = s
        return plaintext

    @staticmethod
    def _skip(s: _State, until: int) -> None:
        if s.nr + MAX_SKIP < until:
            raise TooManySkipped(f"message {until} would skip more than {MAX_SKIP} keys")
        if s.ckr is None or s.dhr is None:
            return
        while s.nr < until:
            s.ckr, mk = kdf_ck(s.ckr)
            s.skipped[(s.dhr, s.nr)] = mk
            s.nr += 1
        while len(s.skipped) > MAX_STORED_SKIPPED:
            del s.skipped[next(iter(s.skipped))]

    def _dh_ratchet(self, s: _State, header: Header) -> None:
        s.pn, s.ns, s.nr = s.ns, 0, 0
        s.dhr = header.dh
        s.rk, s.ckr = kdf_rk(s.rk, p.x25519(s.dhs, s.dhr))
        s.dhs = self._keygen()
        s.rk, s.cks = kdf_rk(s.rk, p.x25519(s.dhs, s.dhr))

    def to_bytes(self) -> bytes:
        """The whole state, skipped keys included, as JSON (secret: store it encrypted)."""
        s = self._state

        def hx(value: bytes | None) -> str | None:
            return None if value is None else value.hex()

        doc = {
            "version": STATE_VERSION,
            "dhs": s.dhs.hex(),
            "dhr": hx(s.dhr),
            "rk": s.rk.hex(),
            "cks": hx(s.cks),
            "ckr": hx(s.ckr),
            "ns": s.ns,
            "nr": s.nr,
            "pn": s.pn,
            "ad": s.ad.hex(),
            "skipped": [[dh.hex(), n, mk.hex()] for (dh, n), mk in s.skipped.items()],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, keygen: KeyGen = p.x25519_generate) -> Ratchet:
        """Inverse of :meth:`to_bytes`; raises :class:`MalformedMessage` on bad input."""
        try:
            doc: dict[str, Any] = json.loads(data)
            if doc["version"] != STATE_VERSION:
                raise MalformedMessage(f"ratchet state version {doc['version']!r}")

            def opt(key: str) -> bytes | None:
                value = doc[key]
                return None if value is None else bytes.fromhex(value)

            state = _State(
                dhs=bytes.fromhex(doc["dhs"]),
                dhr=opt("dhr"),
                rk=bytes.fromhex(doc["rk"]),
                cks=opt("cks"),
                ckr=opt("ckr"),
                ns=int(doc["ns"]),
                nr=int(doc["nr"]),
                pn=int(doc["pn"]),
                ad=bytes.fromhex(doc["ad"]),
                skipped={
                    (bytes.fromhex(d), int(n)): bytes.fromhex(m) for d, n, m in doc["skipped"]
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage("ratchet state does not parse") from exc
        keys = [state.dhs, state.rk, state.dhr, state.cks, state.ckr, *state.skipped.values()]
        if any(key is not None and len(key) != 32 for key in keys):
            raise MalformedMessage("ratchet state holds a key that is not 32 bytes")
        return cls(state, keygen)
