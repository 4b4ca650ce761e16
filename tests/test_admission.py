"""The core's queue decisions (relay.core.admission), property-tested with Hypothesis."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from relay.core.admission import (
    Admission,
    Depth,
    Ident,
    Limit,
    Verdict,
    added_depth,
    admit,
    ident,
    is_expired,
    live_ids,
    page,
)
from relay.model import Address, Envelope, Outcome, QueuedEnvelope, QueueLimits

DEVICES = [Address("t", "bob", 1), Address("t", "bob", 2), Address("t", "carol", 1)]
SENDER = Address("t", "alice", 1)
SENDERS = [SENDER, Address("t", "mallory", 1)]
IDS = [bytes([i]) * 16 for i in range(6)]  # few ids, so that repeats are common

envelopes = st.lists(
    st.builds(
        Envelope,
        message_id=st.sampled_from(IDS),
        sender=st.sampled_from(SENDERS),
        recipient=st.sampled_from(DEVICES),
        content=st.binary(max_size=40),
    ),
    max_size=25,
)
accepted_ids = st.sets(
    st.tuples(st.sampled_from(DEVICES), st.sampled_from(SENDERS), st.sampled_from(IDS)),
    max_size=8,
)
depths = st.dictionaries(
    st.sampled_from(DEVICES),
    st.builds(Depth, st.integers(0, 12), st.integers(0, 1200)),
    max_size=3,
)
limits = st.builds(QueueLimits, st.integers(0, 15), st.integers(0, 1500))


def _replay(
    envs: Sequence[Envelope],
    decisions: Sequence[Admission],
    accepted: set[Ident],
    start: dict[Address, Depth],
    lim: QueueLimits,
) -> None:
    """Check every decision against the facts as they stood just before it."""
    admitted: set[Ident] = set()
    depth = dict(start)
    for env, d in zip(envs, decisions, strict=True):
        ident = (env.recipient, env.sender, env.message_id)
        now = depth.get(env.recipient, Depth())
        fits_depth = now.count + 1 <= lim.max_depth
        fits_bytes = now.bytes + env.size <= lim.max_bytes
        if ident in accepted or ident in admitted:
            assert d.verdict is Verdict.DUPLICATE and d.limit is None
        elif not fits_depth:
            assert d == Admission(Verdict.REJECTED, Limit.DEPTH)  # depth is checked first
        elif not fits_bytes:
            assert d == Admission(Verdict.REJECTED, Limit.BYTES)
        else:
            assert d.verdict is Verdict.ADMITTED and d.limit is None
            admitted.add(ident)
            depth[env.recipient] = Depth(now.count + 1, now.bytes + env.size)


@given(envelopes, accepted_ids, depths, limits)
def test_each_decision_follows_from_the_facts_before_it(
    envs: list[Envelope], accepted: set[Ident], start: dict[Address, Depth], lim: QueueLimits
) -> None:
    decisions = admit(envs, accepted, start, lim)
    assert len(decisions) == len(envs)
    _replay(envs, decisions, accepted, start, lim)


@given(envelopes, accepted_ids, depths, limits)
def test_admitted_envelopes_stay_within_the_limits_and_are_unique(
    envs: list[Envelope], accepted: set[Ident], start: dict[Address, Depth], lim: QueueLimits
) -> None:
    decisions = admit(envs, accepted, start, lim)
    stored = [e for e, d in zip(envs, decisions, strict=True) if d.verdict is Verdict.ADMITTED]
    idents = [(e.recipient, e.sender, e.message_id) for e in stored]
    assert len(set(idents)) == len(idents) and not set(idents) & accepted
    for device, added in added_depth(stored).items():
        before = start.get(device, Depth())
        # An empty queue over its limit already stores nothing; else the sum fits.
        assert before.count + added.count <= max(lim.max_depth, before.count)
        assert before.bytes + added.bytes <= max(lim.max_bytes, before.bytes)


@given(envelopes, accepted_ids, depths, limits)
def test_recipients_are_decided_independently(
    envs: list[Envelope], accepted: set[Ident], start: dict[Address, Depth], lim: QueueLimits
) -> None:
    together = admit(envs, accepted, start, lim)
    for device in DEVICES:
        mine = [i for i, e in enumerate(envs) if e.recipient == device]
        alone = admit([envs[i] for i in mine], accepted, start, lim)
        assert alone == [together[i] for i in mine]


@given(envelopes, depths, limits)
def test_a_rejected_envelope_takes_no_room(
    envs: list[Envelope], start: dict[Address, Depth], lim: QueueLimits
) -> None:
    decisions = admit(envs, set(), start, lim)
    kept = [e for e, d in zip(envs, decisions, strict=True) if d.verdict is not Verdict.REJECTED]
    again = admit(kept, set(), start, lim)
    assert Verdict.REJECTED not in {d.verdict for d in again}


def test_the_same_id_from_another_sender_is_another_envelope() -> None:
    """A sender that used an id first does not make another sender's envelope a duplicate."""
    mid = IDS[0]
    honest = Envelope(mid, SENDERS[0], DEVICES[0], b"honest")
    claim = Envelope(mid, SENDERS[1], DEVICES[0], b"pre-claim")
    assert ident(honest) == (DEVICES[0], SENDERS[0], mid)
    big = QueueLimits(100, 10_000)
    assert admit([honest], {ident(claim)}, {}, big) == [Admission(Verdict.ADMITTED)]
    assert admit([claim, honest], set(), {}, big) == [Admission(Verdict.ADMITTED)] * 2
    assert admit([honest, honest], set(), {}, big)[1].verdict is Verdict.DUPLICATE
    assert admit([honest], {ident(honest)}, {}, big)[0].verdict is Verdict.DUPLICATE


def test_answers_name_the_limit() -> None:
    assert Admission(Verdict.REJECTED, Limit.DEPTH).appended().limit == "max_queue_depth"
    assert Admission(Verdict.REJECTED, Limit.BYTES).appended().outcome is Outcome.REJECTED
    assert Admission(Verdict.ADMITTED).appended(seq=7).seq == 7
    assert Admission(Verdict.DUPLICATE).appended().outcome is Outcome.DUPLICATE


@given(st.dictionaries(st.integers(0, 50), st.integers(0, 100)), st.integers(0, 100))
def test_live_ids_are_those_not_expired(accepted: dict[int, int], now: int) -> None:
    live = live_ids(accepted, now)
    assert live == {i for i, exp in accepted.items() if exp > now}
    assert all(is_expired(accepted[i], now) for i in set(accepted) - live)


def test_expiry_is_inclusive() -> None:
    assert is_expired(100, 100) and not is_expired(101, 100)


rows = st.lists(st.tuples(st.integers(1, 5), st.integers(0, 20)), max_size=20).map(
    lambda steps: [
        QueuedEnvelope(
            sum(s for s, _ in steps[: i + 1]),
            Envelope(bytes([i]) * 16, SENDER, DEVICES[0], b""),
            exp,
        )
        for i, (_, exp) in enumerate(steps)
    ]
)


@given(rows, st.integers(0, 3), st.integers(1, 8), st.integers(0, 20))
def test_a_page_skips_expired_rows_but_moves_past_them(
    fetched: list[QueuedEnvelope], after: int, limit: int, now: int
) -> None:
    got = page(fetched, after, limit, now)
    looked = fetched[:limit]
    assert list(got.items) == [r for r in looked if r.expires_at_ms > now]
    assert got.cursor == (looked[-1].seq if looked else after)
    assert got.more == (len(fetched) > limit)
