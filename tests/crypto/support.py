"""Shared set-up: two devices that ran PQXDH and hold fresh ratchets."""

from __future__ import annotations

from relay.sdk.crypto import pqxdh
from relay.sdk.crypto.prekeys import DevicePrekeys
from relay.sdk.crypto.primitives import x25519_generate
from relay.sdk.crypto.ratchet import KeyGen, Ratchet
from relay.sdk.keys import Identity


def session_pair(
    alice_keygen: KeyGen = x25519_generate, bob_keygen: KeyGen = x25519_generate
) -> tuple[Ratchet, Ratchet]:
    """Alice and Bob after PQXDH; Alice must send first."""
    alice = Identity.generate()
    bob = DevicePrekeys.generate(Identity.generate(), one_time_ec=1, one_time_pq=1)
    bundle = bob.bundle()
    sk, ad, message = pqxdh.initiate(alice, bundle)
    bob_sk, bob_ad = pqxdh.respond(bob, message)
    assert (sk, ad) == (bob_sk, bob_ad)
    spk_private = bob.signed_private(message.signed_prekey_id)
    return (
        Ratchet.initiator(sk, ad, bundle.signed_prekey.public, alice_keygen),
        Ratchet.responder(sk, ad, spk_private, bob_keygen),
    )


def session_pair_with_secret(
    alice_keygen: KeyGen, bob_keygen: KeyGen
) -> tuple[tuple[Ratchet, Ratchet], tuple[bytes, bytes, bytes]]:
    """Like :func:`session_pair`, also returning ``(SK, AD, Bob's signed prekey)``."""
    alice = Identity.generate()
    bob = DevicePrekeys.generate(Identity.generate(), one_time_ec=1, one_time_pq=1)
    bundle = bob.bundle()
    sk, ad, message = pqxdh.initiate(alice, bundle)
    spk_private = bob.signed_private(message.signed_prekey_id)
    pair = (
        Ratchet.initiator(sk, ad, bundle.signed_prekey.public, alice_keygen),
        Ratchet.responder(sk, ad, spk_private, bob_keygen),
    )
    return pair, (sk, ad, spk_private)
