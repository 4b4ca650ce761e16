"""Schedules produce the intended send times their rates promise."""

from __future__ import annotations

import itertools
import math

import pytest

from loadtest.schedule import Constant, Ramp, ScheduleError, Step, parse_schedule


def times(schedule: object, limit: int = 1_000_000) -> list[float]:
    out = []
    for n in range(limit):
        t = schedule.time_of(n)  # type: ignore[attr-defined]
        if t is None:
            return out
        out.append(t)
    raise AssertionError("schedule did not end")


def test_constant_spaces_envelopes_evenly() -> None:
    ts = times(Constant(10.0, 2.0))
    assert len(ts) == 20
    assert ts[:3] == [0.0, 0.1, 0.2]
    assert all(math.isclose(b - a, 0.1) for a, b in itertools.pairwise(ts))


def test_constant_zero_rate_sends_nothing() -> None:
    assert times(Constant(0.0, 5.0)) == []


def test_step_changes_rate_at_each_boundary() -> None:
    s = Step((10.0, 20.0, 0.0, 5.0), 1.0)
    ts = times(s)
    assert len(ts) == 10 + 20 + 0 + 5
    assert [t for t in ts if t < 1] == pytest.approx([i / 10 for i in range(10)])
    assert [t for t in ts if 1 <= t < 2] == pytest.approx([1 + i / 20 for i in range(20)])
    assert not [t for t in ts if 2 <= t < 3]
    assert [t for t in ts if t >= 3] == pytest.approx([3 + i / 5 for i in range(5)])
    assert s.count_by(1.5) == pytest.approx(20)
    assert [seg.rate for seg in s.segments()] == [10.0, 20.0, 0.0, 5.0]


def test_ramp_matches_its_integral() -> None:
    r = Ramp(100.0, 300.0, 2.0)
    ts = times(r)
    assert len(ts) == round(r.count_by(2.0)) == 400
    for n in (0, 1, 57, 250, 399):
        assert r.count_by(ts[n]) == pytest.approx(n, abs=1e-6)
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    assert gaps[0] == pytest.approx(1 / 100, rel=0.02)
    assert gaps[-1] == pytest.approx(1 / 300, rel=0.02)


def test_ramp_down_and_from_zero() -> None:
    down = Ramp(300.0, 100.0, 2.0)
    assert len(times(down)) == 400
    up = Ramp(0.0, 200.0, 1.0)
    ts = times(up)
    assert len(ts) == 100
    assert up.count_by(ts[50]) == pytest.approx(50)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("500", Constant(500.0, 4.0)),
        ("constant:250", Constant(250.0, 4.0)),
        ("step:1,2", Step((1.0, 2.0), 2.0)),
        ("step:1,2,3@5", Step((1.0, 2.0, 3.0), 5.0)),
        ("ramp:10:20", Ramp(10.0, 20.0, 4.0)),
    ],
)
def test_parse(spec: str, expected: object) -> None:
    parsed = parse_schedule(spec, 4.0)
    assert parsed == expected
    assert parse_schedule(parsed.describe(), 4.0) == expected


@pytest.mark.parametrize("spec", ["fast", "step:", "ramp:1", "wave:3", "-5", "constant:nan"])
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ScheduleError):
        parse_schedule(spec, 4.0)
