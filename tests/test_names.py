"""Tenant and user names (``Address.validate``, ``validate_user``): Hypothesis properties."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.config import CassandraConfig, ConfigError
from relay.errors import InvalidArgument
from relay.model import SERVICE_PREFIX, Address, validate_user
from relay.stores.cassandra.migrate import _keyspace

TENANTS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True)
#: Printable, assigned characters (letters, marks, numbers, punctuation, symbols, space).
NAME_CHARS = st.one_of(
    st.characters(categories=("L", "M", "N", "P", "S"), exclude_characters="/"),
    st.just(" "),
)


def _valid(text: str) -> bool:
    return (
        1 <= len(text) <= 128
        and text == text.strip()
        and not text.startswith(SERVICE_PREFIX)
        and "/" not in text
    )


#: Well-formed user ids of device users.
USERS = (
    st.text(NAME_CHARS, min_size=1, max_size=128)
    .map(lambda u: unicodedata.normalize("NFC", u).strip())
    .filter(_valid)
)
#: Characters refused anywhere in a user id: Cc, Cf, Zl, Zp.
REFUSED = st.characters(categories=("Cc", "Cf", "Zl", "Zp"))
WHITESPACE = st.sampled_from(" \t\n\r\x0b\x0c\x85\xa0\u2000\u2028\u2029\u3000")


def _refused(user: str, *words: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        validate_user(user, field="hello.address.user")
    message = info.value.message
    assert message.startswith("hello.address.user "), message
    for word in words:
        assert word in message, message
    return message


@given(tenant=TENANTS, user=USERS, device=st.integers(1, 2**31 - 1))
def test_well_formed_addresses_pass(tenant: str, user: str, device: int) -> None:
    address = Address(tenant, user, device)
    assert address.validate() is address
    assert validate_user(user) == user


@given(tenant=TENANTS, tail=st.sampled_from(["\n", "\r\n", " ", "\x00", "A", "/"]))
def test_a_tenant_is_matched_whole(tenant: str, tail: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^x\.tenant .* use 1-64 of \[a-z0-9_-\]"):
        Address(tenant + tail, "bob", 1).validate(field="x")


@given(text=st.text(max_size=70))
def test_tenant_rule_is_exactly_the_pattern(text: str) -> None:
    ok = re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", text) is not None
    try:
        Address(text, "bob", 1).validate()
    except InvalidArgument as exc:
        assert not ok and "tenant" in exc.message
    else:
        assert ok


@given(user=USERS, ws=WHITESPACE, at_end=st.booleans())
def test_leading_or_trailing_whitespace_is_refused(user: str, ws: str, at_end: bool) -> None:
    padded = user + ws if at_end else ws + user
    assume(len(padded) <= 128)
    _refused(padded, "whitespace")


@given(user=USERS, bad=REFUSED, data=st.data())
def test_control_and_format_characters_are_refused_anywhere(
    user: str, bad: str, data: st.DataObject
) -> None:
    assume(len(user) >= 2)
    at = data.draw(st.integers(1, len(user) - 1))
    inner = user[:at] + bad + user[at:]
    assume(len(inner) <= 128)
    _refused(inner, f"U+{ord(bad):04X}", unicodedata.category(bad))


@given(user=USERS)
def test_a_name_not_in_nfc_is_refused(user: str) -> None:
    decomposed = unicodedata.normalize("NFD", user)
    assume(decomposed != user and len(decomposed) <= 128)
    _refused(decomposed, "NFC")


@pytest.mark.parametrize("user", ["e\u0301", "Cafe\u0301", "\u212b"])  # é, Café, Angstrom sign
def test_known_non_nfc_spellings(user: str) -> None:
    _refused(user, "NFC")
    validate_user(unicodedata.normalize("NFC", user))


@given(user=USERS, device=st.integers(1, 2**31 - 1))
def test_the_service_prefix_is_reserved_for_service_senders(user: str, device: int) -> None:
    name = SERVICE_PREFIX + user
    assume(len(name) <= 128)
    with pytest.raises(InvalidArgument, match=r"^hello\.user .*'service:' is reserved"):
        Address("acme", name, device).validate(field="hello")
    service = Address("acme", name, 0)
    assert service.validate(allow_service=True) is service
    with pytest.raises(InvalidArgument, match=r"hello\.device 0 is out of range 1\.\."):
        service.validate(field="hello")  # device 0 only where service senders may be


@given(user=st.text(NAME_CHARS, min_size=129, max_size=300))
def test_length_is_bounded(user: str) -> None:
    message = _refused(user, "characters", "1-128")
    assert len(message) < 200  # a long name is not echoed whole


@given(user=USERS, data=st.data())
def test_a_slash_is_refused(user: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(user)))
    name = user[:at] + "/" + user[at:]
    assume(len(name) <= 128)
    _refused(name, "'/'")


def test_the_empty_name_is_refused() -> None:
    _refused("", "1-128")


@given(user=st.text(max_size=140))
def test_any_text_is_accepted_or_refused_by_the_rules(user: str) -> None:
    ok = (
        1 <= len(user) <= 128
        and "/" not in user
        and user == user.strip()
        and user.isprintable()
        and not any(unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp"} for c in user)
        and unicodedata.is_normalized("NFC", user)
    )
    try:
        validate_user(user)
    except InvalidArgument as exc:
        assert not ok, exc.message
        assert exc.message.startswith("user ")
    else:
        assert ok


@pytest.mark.parametrize("name", ["relay\n", "relay\r\n", "relay ", "1relay", ""])
def test_a_keyspace_name_is_matched_whole(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^cassandra\.keyspace: "):
        _keyspace(CassandraConfig(keyspace=name))
    assert _keyspace(CassandraConfig(keyspace="relay_1")) == "relay_1"
