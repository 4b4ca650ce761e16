"""Cross-check of the classical ratchet against the MIT ``doubleratchet`` package.

What is compared: the message keys. The oracle's ``DiffieHellmanRatchet`` (Curve25519,
root chain = HKDF-SHA-256 with the RK as salt and our ROOT_INFO, message chains =
separate HMAC-SHA-256 with constants 0x02 || 0x01) is driven with the same PQXDH secret
and the *same sequence of ratchet private keys* as our ratchets, through a scripted
conversation with out-of-order delivery, skipped keys and several DH ratchet steps.

* For every message our side sends, the oracle's sender returns its header (ratchet
  public key, PN, N) and message key: the header must equal ours byte for byte and
  ``seal(oracle_key, plaintext, AD, header)`` must equal our message byte for byte
  (our AEAD is deterministic in the message key, so this pins the key we used).
* For every message our side receives (in scrambled order), the oracle's receiver
  derives the key from the header alone (its skipped keys kept by this test) and that
  key must decrypt the message, as our receiver must.

Why it is meaningful: the oracle is an independent implementation of the spec's
KDF_RK, KDF_CK, DH-ratchet timing and PN/N bookkeeping, so equal keys check all of
those; the AEAD, header encoding and state storage are ours alone and tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator

from doubleratchet.recommended import diffie_hellman_ratchet_curve25519 as curve25519
from doubleratchet.recommended import kdf_hkdf, kdf_separate_hmacs
from doubleratchet.recommended.crypto_provider import HashFunction
from doubleratchet.types import Header as OracleHeader

from relay.sdk.crypto import primitives as p
from relay.sdk.crypto.ratchet import MAX_SKIP, ROOT_INFO, Header, Ratchet, seal, unseal
from tests.crypto.support import session_pair_with_secret


class RootKDF(kdf_hkdf.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return ROOT_INFO


class ChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


def _oracle_class(keys: Iterator[bytes]) -> type[curve25519.DiffieHellmanRatchet]:
    class Scripted(curve25519.DiffieHellmanRatchet):
        @staticmethod
        def _generate_priv() -> bytes:
            return next(keys)

    return Scripted


ORACLE_ARGS = {
    "root_chain_kdf": RootKDF,
    "message_chain_kdf": ChainKDF,
    "message_chain_constant": b"\x02\x01",
    "dos_protection_threshold": MAX_SKIP,
}


class Side:
    """One party: our ratchet and the oracle fed the same ratchet keys."""

    def __init__(self, ours: Ratchet, oracle_cls: type[curve25519.DiffieHellmanRatchet]) -> None:
        self.ours = ours
        self.oracle_cls = oracle_cls
        self.oracle: curve25519.DiffieHellmanRatchet | None = None
        self.skipped: dict[tuple[bytes, int], bytes] = {}


async def test_message_keys_match_the_oracle() -> None:
    alice_keys = [p.x25519_generate() for _ in range(20)]
    bob_keys = [p.x25519_generate() for _ in range(20)]
    ours_a, ours_b = iter(alice_keys), iter(bob_keys)

    (alice_r, bob_r), (sk, ad, spk_private) = session_pair_with_secret(
        lambda: next(ours_a), lambda: next(ours_b)
    )
    alice = Side(alice_r, _oracle_class(iter(alice_keys)))
    bob = Side(bob_r, _oracle_class(iter(bob_keys)))
    alice.oracle = await alice.oracle_cls.create(
        None, p.x25519_public(spk_private), root_chain_key=sk, **ORACLE_ARGS
    )
    compared = 0

    async def send(side: Side, count: int, tag: str) -> list[tuple[bytes, bytes]]:
        nonlocal compared
        assert side.oracle is not None
        out = []
        for i in range(count):
            text = f"{tag}{i}".encode()
            message = side.ours.encrypt(text)
            key, oh = await side.oracle.next_encryption_key()
            header = Header(
                oh.ratchet_pub, oh.previous_sending_chain_length, oh.sending_chain_length
            )
            assert message[:40] == header.encode()
            assert message == seal(key, text, ad, header.encode())
            compared += 1
            out.append((text, message))
        return out

    async def receive(side: Side, batch: list[tuple[bytes, bytes]], order: list[int]) -> None:
        nonlocal compared
        for index in order:
            text, message = batch[index]
            h = Header.decode(message)
            if side.oracle is None:  # Bob's oracle needs Alice's first ratchet key up front
                side.oracle = await side.oracle_cls.create(
                    spk_private, h.dh, root_chain_key=sk, **ORACLE_ARGS
                )
            key = side.skipped.pop((h.dh, h.n), None)
            if key is None:
                key, skipped = await side.oracle.next_decryption_key(OracleHeader(h.dh, h.pn, h.n))
                side.skipped.update(skipped)
            assert unseal(key, message, ad) == text
            assert side.ours.decrypt(message) == text
            compared += 1

    a1 = await send(alice, 5, "a")
    await receive(bob, a1, [2, 0, 4])
    b1 = await send(bob, 3, "b")
    await receive(alice, b1, [1, 0])
    a2 = await send(alice, 3, "c")
    await receive(bob, a1 + a2, [6, 1, 5, 3, 7])
    b2 = await send(bob, 2, "d")
    await receive(alice, b1 + b2, [4, 2, 3])
    for turn in range(3):
        await receive(bob, await send(alice, 2, f"e{turn}"), [1, 0])
        await receive(alice, await send(bob, 1, f"f{turn}"), [0])
    assert compared == 2 * (5 + 3 + 3 + 2 + 3 * 3)
