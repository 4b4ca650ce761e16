"""Hypothesis strategies for any protobuf message, built from its descriptor.

``messages(descriptor)`` sets a random subset of the fields (at most one per oneof):
scalars of every type with their extremes, empty, random and huge strings and bytes
(unicode, control characters, NFD forms), repeated fields of 0..N items (sometimes
hundreds, to cross batch limits), nested messages down to a bounded depth, and open
enum values the schema does not name. ``Hints`` bias chosen fields and message types
toward values the servers know (registered tenants, users, addresses), so that requests
get past the first validation and reach authorisation and storage.
"""

from __future__ import annotations

import functools
import random
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from relay import authproof

#: Nested messages deeper than this are left unset.
MAX_DEPTH = 4
#: Items of an ordinary repeated field.
MAX_ITEMS = 4
#: Bounds of a "long" repeated field (the same item again and again).
LONG_ITEMS = (200, 1100)
#: A long repeated field stops growing at about this many serialized bytes.
LONG_BUDGET_BYTES = 256 * 1024
#: A huge string or bytes value: a short pattern repeated up to this many times.
HUGE_REPEAT = (1_000, 30_000)

F = FieldDescriptor

_INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

_INTERESTING_INTS = (
    0, 1, 2, 3, 7, 255, 256, 1000, 1001, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31,
    2**32 - 1, 2**32, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
    1_700_000_000_000, 1_700_000_060_001,  # near the fake clock of the servers (ms)
    -1, -2, -(2**31), -(2**31) - 1, -(2**63),
)  # fmt: skip

_TRICKY_TEXT = (
    "default",
    "Default",
    "DEFAULT",
    "default\x00",
    " default",
    "a/b/1",
    "../../etc/passwd",
    "%s%n%x",
    "'; DROP TABLE devices; --",
    "\x00",
    "\x7f",
    "\u200b",  # zero-width space
    "\u202e",  # right-to-left override
    "\ufeff",  # byte order mark
    "\ufb01",  # the ligature fi
    "\uff44\uff45\uff46\uff41\uff55\uff4c\uff54",  # fullwidth "default"
    "ǅ",  # titlecase digraph
    "İ",  # lowercases to two code points
    "e\u0301",  # NFD é
    "\u00e9",  # NFC é
    "\U0001f600",
    "a" * 64,
    "a" * 65,
    "1" * 20,
    "-1",
    "9" * 25,
)

_TEXT_ALPHABETS = (
    st.characters(codec="utf-8"),  # any code point but surrogates
    st.characters(codec="ascii"),  # with control characters
    st.sampled_from("abcxyz019-_/."),  # almost a valid name
)


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def _repeat(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A huge value from a short one, cheaply (Hypothesis never generates it byte by byte)."""
    return st.builds(lambda part, n: part * n, strategy, st.integers(*HUGE_REPEAT))


def text() -> st.SearchStrategy[str]:
    """Any string protobuf can carry: empty, tricky, unicode, control, NFD, huge."""
    return st.one_of(
        st.just(""),
        st.sampled_from(_TRICKY_TEXT),
        st.sampled_from(_TRICKY_TEXT).map(_nfd),
        *(st.text(alphabet, max_size=80) for alphabet in _TEXT_ALPHABETS),
        st.text(st.characters(categories=("Lu", "Ll", "Mn"), codec="utf-8"), max_size=12).map(_nfd),
        _repeat(st.text(st.characters(codec="utf-8"), min_size=1, max_size=3)),
    )


def _random_bytes(size: int) -> st.SearchStrategy[bytes]:
    """``size`` random bytes from a drawn seed: cheap to generate and to shrink."""
    return st.integers(0, 2**32 - 1).map(lambda seed: random.Random(seed).randbytes(size))


def binary() -> st.SearchStrategy[bytes]:
    """Any bytes value: empty, key- and signature-sized, small-order keys, huge."""
    return st.one_of(
        st.just(b""),
        st.binary(max_size=80),
        *(st.binary(min_size=n, max_size=n) for n in (16, 32)),
        *(_random_bytes(n) for n in (64, 1568)),
        st.sampled_from(sorted(authproof.SMALL_ORDER_KEYS)),
        _repeat(st.binary(min_size=1, max_size=3)),
    )


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in ``[lo, hi]``, often their extremes and other edge values."""
    edges = sorted({lo, lo + 1, hi - 1, hi, *(i for i in _INTERESTING_INTS if lo <= i <= hi)})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


@dataclass(frozen=True, eq=False)  # hashed by identity: strategies are cached per Hints
class Hints:
    """Values to offer next to random ones.

    ``fields`` maps a field name (any message) to a strategy for one value of it;
    ``messages`` maps a message's full name to a strategy for a whole message.
    """

    fields: Mapping[str, st.SearchStrategy[Any]] = field(default_factory=dict)
    messages: Mapping[str, st.SearchStrategy[Message]] = field(default_factory=dict)


NO_HINTS = Hints()


@functools.cache
def scalars(fd: FieldDescriptor, hints: Hints = NO_HINTS) -> st.SearchStrategy[Any]:
    """One value of the scalar (or enum) field ``fd``."""
    base = _scalars(fd)
    hint = hints.fields.get(fd.name)
    return base if hint is None else st.one_of(hint, base)


def _scalars(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = fd.type
    if kind in _INT_RANGES:
        return integers(*_INT_RANGES[kind])
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return text()
    if kind == F.TYPE_BYTES:
        return binary()
    if kind == F.TYPE_DOUBLE:
        return st.floats()
    if kind == F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == F.TYPE_ENUM:
        assert fd.enum_type is not None
        named = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(named), integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {fd.full_name} of type {kind}")


@functools.cache
def messages(
    descriptor: Descriptor, hints: Hints = NO_HINTS, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of type ``descriptor`` with a random subset of their fields set."""
    base = _messages(descriptor, hints, depth)
    hint = hints.messages.get(descriptor.full_name)
    return base if hint is None else st.one_of(hint, base)


def _messages(descriptor: Descriptor, hints: Hints, depth: int) -> st.SearchStrategy[Message]:
    oneof_fields = {f.full_name for o in descriptor.oneofs for f in o.fields}

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = GetMessageClass(descriptor)()
        chosen = [
            f
            for o in descriptor.oneofs
            if (f := draw(st.sampled_from([None, *o.fields]))) is not None
        ]
        chosen += [
            f for f in descriptor.fields if f.full_name not in oneof_fields and draw(st.booleans())
        ]
        for fd in chosen:
            if fd.message_type is not None and depth >= MAX_DEPTH:
                continue
            _set(draw, message, fd, hints, depth)
        return message

    return build()


def _set(draw: st.DrawFn, message: Message, fd: FieldDescriptor, hints: Hints, depth: int) -> None:
    """Set field ``fd`` of ``message`` to a drawn value."""
    target = getattr(message, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key_fd, value_fd = (
            fd.message_type.fields_by_name["key"],
            fd.message_type.fields_by_name["value"],
        )
        for key in draw(st.lists(scalars(key_fd, hints), max_size=MAX_ITEMS)):
            if value_fd.message_type is not None:
                target[key].CopyFrom(draw(messages(value_fd.message_type, hints, depth + 1)))
            else:
                target[key] = draw(scalars(value_fd, hints))
        return
    one: Callable[[], Any]
    if fd.message_type is not None:
        item = messages(fd.message_type, hints, depth + 1)

        def one() -> Any:
            return draw(item)
    else:
        value = scalars(fd, hints)

        def one() -> Any:
            return draw(value)

    if not fd.is_repeated:
        if fd.message_type is not None:
            target.CopyFrom(one())
        else:
            setattr(message, fd.name, one())
        return
    if draw(st.integers(0, 9)) == 0:  # now and then hundreds of one item: batch limits
        sample = one()
        size = sample.ByteSize() if isinstance(sample, Message) else len(str(sample))
        count = min(draw(st.integers(*LONG_ITEMS)), LONG_BUDGET_BYTES // max(size, 1))
        target.extend([sample] * count)
    else:
        target.extend(one() for _ in range(draw(st.integers(0, MAX_ITEMS))))
