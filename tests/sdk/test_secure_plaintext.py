"""The padded plaintext framing inside ratchet messages (relay.sdk.secure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.sdk.crypto.errors import MalformedMessage
from relay.sdk.secure import PAD_BLOCK, decode_plaintext, encode_plaintext


@given(body=st.binary(max_size=1000), sent_to=st.none() | st.text(min_size=1, max_size=40))
def test_round_trip_padded_to_the_block(body: bytes, sent_to: str | None) -> None:
    plaintext = encode_plaintext(body, sent_to)
    assert len(plaintext) % PAD_BLOCK == 0
    assert decode_plaintext(plaintext) == (sent_to, body)


def test_lengths_within_a_block_look_alike() -> None:
    assert len(encode_plaintext(b"")) == len(encode_plaintext(b"x" * 100)) == PAD_BLOCK
    assert len(encode_plaintext(b"x" * 200)) == 2 * PAD_BLOCK


@pytest.mark.parametrize(
    ("plaintext", "why"),
    [
        (b"", "version"),
        (bytes([1, 0]) + b"old", "version"),
        (bytes([2, 7]) + bytes(126), "kind"),
        (encode_plaintext(b"hi")[:-1] + b"\x01", "padding"),
        (encode_plaintext(b"hi")[:5], "truncated"),
    ],
)
def test_malformed_plaintexts_are_refused(plaintext: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        decode_plaintext(plaintext)
