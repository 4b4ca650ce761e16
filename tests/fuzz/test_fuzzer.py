"""The fuzzer's own checks can fail: a self-test of its properties and generators."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings

from relaypb.keys.v1 import keys_pb2
from tests.fuzz.messages import messages
from tests.fuzz.methods import (
    ALL_RPCS,
    KEY_DIRECTORY,
    RELAY,
    REQUEST_TYPES,
    STREAMING_RPCS,
    UNARY_RPCS,
)
from tests.fuzz.payloads import field_boundaries, parsable_part
from tests.fuzz.target import Outcome, SqliteState, changed_tables, check_answer

LIST_DEVICES = next(r for r in ALL_RPCS if r.name == "ListDevices")


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[SqliteState, sqlite3.Connection]]:
    """A WAL database with one table, a writer connection, and the state reading it."""
    writer = sqlite3.connect(tmp_path / "some.db", isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (a INTEGER, b BLOB)")
    writer.execute("INSERT INTO t VALUES (1, x'00'), (2, x'01')")
    (tmp_path / "not-a-database.txt").write_text("SQLite format 2\n")
    state = SqliteState(tmp_path)
    yield state, writer
    state.close()
    writer.close()


def test_every_method_of_both_services_is_fuzzed() -> None:
    named = {m.full_name for s in (KEY_DIRECTORY, RELAY) for m in s.methods}
    assert {f"{r.service}.{r.name}" for r in UNARY_RPCS + STREAMING_RPCS} == named


def test_state_sees_every_committed_change(
    database: tuple[SqliteState, sqlite3.Connection],
) -> None:
    state, writer = database
    assert [p.name for p in state.files()] == ["some.db"]
    first = state.snapshot()
    assert changed_tables(first, state.snapshot()) == []
    writer.execute("UPDATE t SET b = x'02' WHERE a = 1")  # same row count, other content
    second = state.snapshot()
    assert changed_tables(first, second) == ["some.db:t"]
    writer.execute("CREATE TABLE u (c TEXT)")
    assert changed_tables(second, state.snapshot()) == ["some.db:sqlite_master", "some.db:u"]


def test_check_refuses_bad_statuses_bad_responses_and_refusals_that_write(
    database: tuple[SqliteState, sqlite3.Connection],
) -> None:
    state, writer = database
    before = state.snapshot()
    check_answer(LIST_DEVICES, Outcome(grpc.StatusCode.NOT_FOUND, "no"), before, state, b"", "")
    check_answer(LIST_DEVICES, Outcome(grpc.StatusCode.OK, "", b""), before, state, b"", "")
    for code in (
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        with pytest.raises(AssertionError, match=code.name):
            check_answer(LIST_DEVICES, Outcome(code, "boom"), before, state, b"", "")
    with pytest.raises(AssertionError, match="does not parse"):
        bad = Outcome(grpc.StatusCode.OK, "", b"\xff\xff")
        check_answer(LIST_DEVICES, bad, before, state, b"", "")
    writer.execute("DELETE FROM t WHERE a = 2")
    with pytest.raises(AssertionError, match=r"refused request changed \['some.db:t'\]"):
        refused = Outcome(grpc.StatusCode.PERMISSION_DENIED, "no")
        check_answer(LIST_DEVICES, refused, before, state, b"", "")
    ok = Outcome(grpc.StatusCode.OK, "", b"")
    check_answer(LIST_DEVICES, ok, before, state, b"", "")  # an OK answer may write


def _fields_set(message: Message) -> set[str]:
    return {fd.name for fd, _ in message.ListFields()}


@pytest.mark.parametrize("descriptor", REQUEST_TYPES, ids=lambda d: d.name)
def test_generated_requests_set_every_field(descriptor: Descriptor) -> None:
    seen: set[str] = set()

    @settings(
        max_examples=40,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages(descriptor))
    def collect(message: Message) -> None:
        seen.update(_fields_set(message))

    collect()
    assert seen == {f.name for f in descriptor.fields}


def test_parsable_part_keeps_the_fields_that_parse() -> None:
    good = keys_pb2.ListDevicesRequest(tenant="t", user="u").SerializeToString()
    assert field_boundaries(good) == [3, 6]
    # A tenant that is not UTF-8 does not parse: only that field goes.
    assert parsable_part(LIST_DEVICES.request, b"\x0a\x02\xff\xfe" + good) == good
    assert parsable_part(LIST_DEVICES.request, good + b"\x0a\x05ab") == good  # cut short
    assert parsable_part(LIST_DEVICES.request, b"\xff") == b""
