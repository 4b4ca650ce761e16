"""Hostile bytes and metadata: what goes on the wire besides well-formed requests.

Raw payloads are sent with an identity serializer, so the server's own parser meets
them: truncated serializations of generated requests, random bytes, a message of
another type, a serialization with bytes flipped or appended, unknown fields; and
(once per RPC, being slow) one larger than the servers' message limit. Metadata comes
as a plan (``Credentials``) that the target turns into headers at call time, because a
signature covers the time and the exact request it goes with.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor
from hypothesis import strategies as st

from relay import authproof
from tests.fuzz.messages import NO_HINTS, Hints, messages
from tests.fuzz.methods import REQUEST_TYPES, parse

#: Larger than relay.common.grpcserver.MAX_MESSAGE_BYTES (16 MiB).
OVERSIZED_BYTES = 16 * 1024 * 1024 + 64

Header = tuple[str, str | bytes]

DEVICE = authproof.REQUEST_DEVICE_HEADER
TIME = authproof.REQUEST_TIME_HEADER
SIGNATURE = authproof.REQUEST_SIGNATURE_HEADER
AUTHORIZATION = "authorization"


def serialized(descriptor: Descriptor, hints: Hints = NO_HINTS) -> st.SearchStrategy[bytes]:
    """Deterministic serializations of generated ``descriptor`` messages."""
    return messages(descriptor, hints).map(lambda m: m.SerializeToString(deterministic=True))


@st.composite
def _truncated(draw: st.DrawFn, whole: st.SearchStrategy[bytes]) -> bytes:
    data = draw(whole)
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))]


@st.composite
def _mutated(draw: st.DrawFn, whole: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(whole))
    for _ in range(draw(st.integers(1, 4))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


def oversized_payload() -> bytes:
    """One field 1 of ``OVERSIZED_BYTES`` ASCII bytes: parses as any request whose field
    1 is a string, bytes or unknown, and the transport refuses it before any parser."""
    return b"\x0a" + _encode_varint(OVERSIZED_BYTES) + b"a" * OVERSIZED_BYTES


def raw_payloads(descriptor: Descriptor, hints: Hints = NO_HINTS) -> st.SearchStrategy[bytes]:
    """Bytes that claim to be a ``descriptor`` request and mostly are not quite one."""
    own = serialized(descriptor, hints)
    others = [d for d in REQUEST_TYPES if d.full_name != descriptor.full_name] or [descriptor]
    foreign = st.sampled_from(others).flatmap(lambda d: serialized(d, hints))
    return st.one_of(
        _truncated(own), st.binary(max_size=64), foreign, _mutated(own), _mutated(foreign)
    )


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    """The varint at ``data[at:]`` and the offset after it, or None if it is cut short."""
    value = shift = 0
    while at < len(data) and shift < 70:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    return None


def field_boundaries(data: bytes) -> list[int]:
    """Offsets at which a top-level field of ``data`` ends, up to the first broken one."""
    ends: list[int] = []
    at = 0
    while at < len(data):
        tag = _varint(data, at)
        if tag is None:
            break
        key, at = tag
        kind = key & 7
        if kind == 0:
            value = _varint(data, at)
            if value is None:
                break
            at = value[1]
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
        elif kind == 2:
            length = _varint(data, at)
            if length is None:
                break
            at = length[1] + length[0]
        else:  # groups and invalid wire types: stop here
            break
        if at > len(data):
            break
        ends.append(at)
    return ends


def parsable_part(descriptor: Descriptor, data: bytes, limit: int = 32) -> bytes:
    """The whole top-level fields of ``data`` that parse as ``descriptor``, in order.

    All of them if they parse together; else, of the first ``limit``, each one that still
    parses after the ones kept before it. The empty message always parses.
    """
    ends = field_boundaries(data)
    if ends and parse(descriptor, data[: ends[-1]]) is not None:
        return data[: ends[-1]]
    kept = b""
    for start, end in itertools.pairwise([0, *ends[:limit]]):
        candidate = kept + data[start:end]
        if parse(descriptor, candidate) is not None:
            kept = candidate
    return kept


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@st.composite
def unknown_fields(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """Well-formed fields whose numbers ``descriptor`` does not define (parsers keep them)."""
    known = set(descriptor.fields_by_number)
    numbers = st.integers(1, 2**29 - 1).filter(lambda n: n not in known and not 19000 <= n < 20000)
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        number, kind = draw(numbers), draw(st.sampled_from((0, 1, 2, 5)))
        if kind == 0:
            body = _encode_varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == 2:
            value = draw(st.binary(max_size=40))
            body = _encode_varint(len(value)) + value
        else:
            body = draw(st.binary(min_size=8 if kind == 1 else 4, max_size=8 if kind == 1 else 4))
        out += _encode_varint(number << 3 | kind) + body
    return out


def parsable_payloads(descriptor: Descriptor, hints: Hints = NO_HINTS) -> st.SearchStrategy[bytes]:
    """Raw payloads cut down to the fields the request type's parser accepts.

    Where nothing is left, a generated request with unknown fields mixed in instead.
    """

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        part = parsable_part(descriptor, draw(raw_payloads(descriptor, hints)))
        if part:
            return part
        whole = draw(serialized(descriptor, hints))
        at = draw(st.sampled_from([0, *field_boundaries(whole)]))
        return whole[:at] + draw(unknown_fields(descriptor)) + whole[at:]

    return build()


def unparsable_payloads(
    descriptor: Descriptor, hints: Hints = NO_HINTS
) -> st.SearchStrategy[bytes]:
    """Raw payloads the request type's parser refuses (about two in three are)."""
    return raw_payloads(descriptor, hints).filter(lambda data: parse(descriptor, data) is None)


@dataclass(frozen=True)
class Anonymous:
    """No credentials at all."""


@dataclass(frozen=True)
class Headers:
    """These headers exactly (garbage, partial, duplicated)."""

    pairs: tuple[Header, ...]


@dataclass(frozen=True)
class SignedBy:
    """A request signed by the identity key of a registered device.

    ``signer`` names a device of the target's roster. The signature is real; what may
    be wrong is the rest: ``claim`` (an address text sent instead of the signer's),
    ``skew_ms`` (the signed time, relative to the servers' clock), ``method`` (a
    signature made for another method) or ``tampered`` (made for other bytes).
    ``extra`` headers follow the signed ones (a second device header, say).
    """

    signer: str
    claim: str | None = None
    skew_ms: int = 0
    method: str | None = None
    tampered: bool = False
    extra: tuple[Header, ...] = ()


@dataclass(frozen=True)
class Bearer:
    """``authorization: Bearer <token>``; ``VALID_API_KEY`` is a real key of tenant "other"."""

    token: str


VALID_API_KEY = "<the api key of tenant other>"

Credentials = Anonymous | Headers | SignedBy | Bearer

_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def _header_text() -> st.SearchStrategy[str]:
    """Values gRPC lets a client send in a text header (printable ASCII), incl. long ones.

    At most 2,400 characters: five of them stay under gRPC's 16 KiB metadata limit, whose
    refusal costs a reconnection (``OVERSIZED_HEADER`` tests it once per RPC).
    """
    return st.one_of(
        st.just(""),
        st.text(_PRINTABLE, max_size=40),
        st.builds(lambda s, n: s * n, st.text(_PRINTABLE, min_size=1, max_size=3),
                  st.integers(300, 800)),
    )  # fmt: skip


#: One header over gRPC's 16 KiB metadata limit (the transport refuses it).
OVERSIZED_HEADER: Header = ("x-fuzz-oversized", "a" * 17_000)


_DEVICE_VALUES = (
    "default/victim/1",
    "default/victim/01",
    "default/victim/+1",
    "default/victim/-1",
    "default/victim/0",
    "default/victim/4294967296",
    "default/victim/99999999999999999999999",
    "default/victim/1/",
    "default/victim/ 1",
    "default/victim",
    "//",
    "///",
    "default//1",
    "/victim/1",
    "DEFAULT/VICTIM/1",
    "other/mallory/1",
)
_TIME_VALUES = (
    "0",
    "-1",
    "+1700000000000",
    "1700000000000",
    "1700000000000.5",
    "1e12",
    " 1700000000000",
    "0x18bcfe56800",
    "9223372036854775807",
    "9223372036854775808",
    "9" * 19,
    "9" * 20,
    "00000000000000000001",
)
_BEARER_VALUES = (
    "Bearer",
    "Bearer ",
    "bearer x",
    "Basic dXNlcjpwYXNz",
    "Bearer " + "a" * 15,
    "Bearer " + "a" * 4096,
    "Bearer  " + VALID_API_KEY,
)


def _headers() -> st.SearchStrategy[Header]:
    text = _header_text()
    return st.one_of(
        st.tuples(st.just(DEVICE), st.one_of(st.sampled_from(_DEVICE_VALUES), text)),
        st.tuples(st.just(TIME), st.one_of(st.sampled_from(_TIME_VALUES), text)),
        st.tuples(
            st.just(SIGNATURE),
            st.one_of(
                st.binary(max_size=80),
                st.binary(min_size=64, max_size=64),
                st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=2),
                          st.integers(300, 1_000)),
            ),
        ),
        st.tuples(st.just(AUTHORIZATION), st.one_of(st.sampled_from(_BEARER_VALUES), text)),
        st.tuples(st.text("abcz019_.-", max_size=12).map(lambda k: "x-fuzz-" + k), text),
    )  # fmt: skip


def credentials(
    signers: tuple[str, ...], methods: tuple[str, ...]
) -> st.SearchStrategy[Credentials]:
    """Every kind of credentials: none, garbage, a real signature gone wrong, API keys.

    ``signers`` name the roster devices that may sign (never the owner of what the
    request is about: those would be authorised); ``methods`` are the paths a
    signature may be made for instead of the called one.
    """
    signed = st.builds(
        SignedBy,
        signer=st.sampled_from(signers),
        claim=st.one_of(st.none(), st.sampled_from(_DEVICE_VALUES)),
        skew_ms=st.sampled_from((0, 0, 0, 1, -1, 59_999, -59_999, 60_001, -60_001, -(2**40))),
        method=st.one_of(st.none(), st.sampled_from(methods)),
        tampered=st.booleans(),
        extra=st.lists(_headers(), max_size=2).map(tuple),
    )
    correctly_signed = st.builds(SignedBy, signer=st.sampled_from(signers))
    return st.one_of(
        st.just(Anonymous()),
        st.lists(_headers(), max_size=5).map(lambda pairs: Headers(tuple(pairs))),
        correctly_signed,
        signed,
        st.one_of(st.just(VALID_API_KEY), _header_text()).map(Bearer),
    )
