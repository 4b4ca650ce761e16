"""The small-order blocklist, checked with independent Edwards-curve arithmetic."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyserver import validation
from tests.keyserver.keys import DeviceKeys

P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int]
IDENTITY: Point = (0, 1)


def decode(data: bytes) -> Point | None:
    """RFC 8032 5.1.3 point decoding, but accepting non-canonical y (as some verifiers do)."""
    y = int.from_bytes(data, "little") & ((1 << 255) - 1)
    sign = data[31] >> 7
    y %= P
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P == (-u) % P:
        x = x * SQRT_M1 % P
    elif v * x * x % P != u:
        return None
    if x & 1 != sign:
        x = (-x) % P
    return (x, y)


def add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return (x3, y3)


def times8(point: Point) -> Point:
    for _ in range(3):
        point = add(point, point)
    return point


def test_every_blocklisted_encoding_is_a_small_order_point() -> None:
    for encoding in validation._SMALL_ORDER:
        point = decode(encoding)
        assert point is not None, encoding.hex()
        assert times8(point) == IDENTITY, encoding.hex()


def test_the_blocklist_covers_the_whole_small_order_subgroup() -> None:
    def order(point: Point) -> int:
        n, q = 1, point
        while q != IDENTITY:
            q, n = add(q, point), n + 1
        return n

    decoded = [p for p in map(decode, validation._SMALL_ORDER) if p is not None]
    order8 = next(p for p in decoded if order(p) == 8)
    multiples, point = [], IDENTITY
    for _ in range(8):
        point = add(point, order8)
        multiples.append(point)
    assert len(set(multiples)) == 8
    for x, y in multiples:
        canonical = bytearray(y.to_bytes(32, "little"))
        canonical[31] |= (x & 1) << 7
        assert decode(bytes(canonical)) == (x, y)
        assert validation.is_small_order(bytes(canonical))


def test_the_identity_point_really_is_forgeable() -> None:
    # Why the blocklist exists: with the identity point as public key, R = identity and
    # s = 0 "verify" for any message, so proofs of possession would prove nothing.
    identity = bytes([1]) + bytes(31)
    forged = identity + bytes(32)
    Ed25519PublicKey.from_public_bytes(identity).verify(forged, b"any message at all")
    assert validation.is_small_order(identity)
    assert validation.is_small_order(bytes([1]) + bytes(30) + bytes([0x80]))


@pytest.mark.parametrize("_", range(20))
def test_real_keys_are_not_small_order(_: int) -> None:
    assert not validation.is_small_order(DeviceKeys().identity_key)
