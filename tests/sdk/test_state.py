"""Unit tests of the device state file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from relay.clock import FakeClock
from relay.model import Address
from relay.sdk.keys import Identity, Prekey, generate_one_time_prekeys
from relay.sdk.state import DEDUP_RETENTION_MS, DeviceState, ReceivedMessage

ALICE = Address("default", "alice", 1)
BOB = Address("default", "bob", 2)


def msg(sender: Address, n: int, content: bytes = b"hi") -> ReceivedMessage:
    return ReceivedMessage(sender, n.to_bytes(16, "big"), content, 1_000 + n)


def test_new_home_is_private(tmp_path: Path) -> None:
    home = tmp_path / "a" / "home"
    old = os.umask(0o022)
    try:
        with DeviceState.open(home) as state:
            state.save_identity(Identity.generate())
            state.accept([msg(ALICE, 1)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for path in home.iterdir():  # device.db and its WAL companions
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert (home / "device.db").exists()


def test_identity_address_and_prekeys_survive_reopen(tmp_path: Path) -> None:
    identity = Identity.generate()
    signed = Prekey.generate_signed(identity, 1)
    one_time = generate_one_time_prekeys(2, 3)
    with DeviceState.open(tmp_path) as state:
        assert state.identity() is None
        assert state.address() is None
        state.save_identity(identity, [signed, *one_time])
        with pytest.raises(FileExistsError):
            state.save_identity(Identity.generate())
        state.save_address(BOB)
    with DeviceState.open(tmp_path) as state:
        again = state.identity()
        assert again is not None
        assert again.private_bytes() == identity.private_bytes()
        assert state.address() == BOB
        assert state.prekeys() == [signed, *one_time]
        assert state.prekeys(3) == [one_time[1]]
        assert state.next_prekey_id() == 5
        assert state.remove_prekey(3)
        assert not state.remove_prekey(3)
        assert state.prekeys(3) == []


def test_save_address_needs_an_identity(tmp_path: Path) -> None:
    with DeviceState.open(tmp_path) as state, pytest.raises(LookupError):
        state.save_address(BOB)


def test_accept_dedups_and_survives_reopen(tmp_path: Path) -> None:
    with DeviceState.open(tmp_path) as state:
        assert state.accept([msg(ALICE, 1), msg(ALICE, 2), msg(BOB, 1)]) == 3
        assert state.accept([msg(ALICE, 2), msg(ALICE, 3)]) == 1
        entries = state.inbox()
        assert [(e.message.sender, e.message.message_id) for e in entries] == [
            (ALICE, msg(ALICE, 1).message_id),
            (ALICE, msg(ALICE, 2).message_id),
            (BOB, msg(BOB, 1).message_id),
            (ALICE, msg(ALICE, 3).message_id),
        ]
        assert entries[0].message == msg(ALICE, 1)
        assert state.remove_from_inbox([msg(ALICE, 1), msg(BOB, 1)]) == 2
        assert state.remove_from_inbox([msg(ALICE, 1)]) == 0
    with DeviceState.open(tmp_path) as state:
        # Acknowledged or not, a message id seen before is never accepted again.
        assert state.accept([msg(ALICE, 1), msg(ALICE, 2), msg(BOB, 1)]) == 0
        assert [e.message for e in state.inbox()] == [msg(ALICE, 2), msg(ALICE, 3)]
        assert state.was_received(BOB, msg(BOB, 1).message_id)
        assert not state.was_received(BOB, msg(BOB, 2).message_id)


def test_inbox_pages_by_cursor(tmp_path: Path) -> None:
    with DeviceState.open(tmp_path) as state:
        state.accept([msg(ALICE, n) for n in range(5)])
        first = state.inbox(after=0, limit=2)
        assert [e.message.message_id for e in first] == [msg(ALICE, n).message_id for n in (0, 1)]
        rest = state.inbox(after=first[-1].seq, limit=10)
        assert [e.message for e in rest] == [msg(ALICE, n) for n in (2, 3, 4)]
        assert state.inbox(after=rest[-1].seq) == []


def test_prune_forgets_old_ids_but_not_unacked_ones(tmp_path: Path) -> None:
    clock = FakeClock()
    with DeviceState.open(tmp_path, clock=clock) as state:
        state.accept([msg(ALICE, 1), msg(ALICE, 2)])
        state.remove_from_inbox([msg(ALICE, 1)])
        clock.advance(DEDUP_RETENTION_MS - 1)
        assert state.prune() == 0
        clock.advance(2)
        assert state.prune() == 1  # message 2 is still in the inbox: its id stays
        assert not state.was_received(ALICE, msg(ALICE, 1).message_id)
        assert state.was_received(ALICE, msg(ALICE, 2).message_id)
