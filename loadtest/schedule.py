"""Open-loop rate schedules: when each envelope is due.

A schedule is a rate r(t) in envelopes per second over ``[0, duration)``. Envelope number
``n`` (0-based, counted over all workers) is due at the time ``t`` where the expected count
``∫0..t r`` reaches ``n``; that *intended* time, not the time the generator managed to send
it, is where its latency starts (no coordinated omission). Times are seconds from the
start of the run.

Spec strings (``--schedule``)::

    5000 | constant:5000            5000 envelopes/s for the whole duration
    step:1000,2000,4000             each rate for duration/3 seconds
    step:1000,2000,4000@5           each rate for 5 s (duration = 15 s)
    ramp:1000:20000                 linear from 1000/s to 20000/s over the duration
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class ScheduleError(ValueError):
    """A schedule spec that cannot be parsed, or values out of range."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A steady part of a schedule: ``rate`` envelopes/s from ``start`` to ``end`` seconds."""

    start: float
    end: float
    rate: float


class Schedule(Protocol):
    """A rate over time, and its inverse: the intended time of the n-th envelope."""

    @property
    def duration(self) -> float:
        """Seconds the schedule lasts."""
        ...

    def rate_at(self, t: float) -> float:
        """Envelopes per second at time ``t`` (0 outside the schedule)."""
        ...

    def count_by(self, t: float) -> float:
        """Expected envelopes due in ``[0, t]`` (clamped to the schedule)."""
        ...

    def time_of(self, n: float) -> float | None:
        """Intended time of envelope ``n`` (0-based), or None if it falls after the end."""
        ...

    def segments(self) -> tuple[Segment, ...]:
        """The steady parts (one per step; none for a ramp)."""
        ...

    def describe(self) -> str:
        """The spec string that recreates this schedule."""
        ...


def _check_rate(rate: float) -> float:
    if not math.isfinite(rate) or rate < 0:
        raise ScheduleError(f"rate {rate!r} must be a finite number >= 0")
    return rate


@dataclass(frozen=True, slots=True)
class Constant:
    """``rate`` envelopes/s for ``duration`` seconds."""

    rate: float
    duration: float

    def rate_at(self, t: float) -> float:
        """See Schedule.rate_at."""
        return self.rate if 0 <= t < self.duration else 0.0

    def count_by(self, t: float) -> float:
        """See Schedule.count_by."""
        return self.rate * min(max(t, 0.0), self.duration)

    def time_of(self, n: float) -> float | None:
        """See Schedule.time_of."""
        if self.rate <= 0:
            return None
        t = n / self.rate
        return t if t < self.duration else None

    def segments(self) -> tuple[Segment, ...]:
        """See Schedule.segments."""
        return (Segment(0.0, self.duration, self.rate),)

    def describe(self) -> str:
        """See Schedule.describe."""
        return f"constant:{self.rate:g}"


@dataclass(frozen=True, slots=True)
class Step:
    """Each of ``rates`` in turn, for ``step_seconds`` each."""

    rates: tuple[float, ...]
    step_seconds: float

    @property
    def duration(self) -> float:
        """See Schedule.duration."""
        return self.step_seconds * len(self.rates)

    def rate_at(self, t: float) -> float:
        """See Schedule.rate_at."""
        if not 0 <= t < self.duration:
            return 0.0
        return self.rates[min(int(t // self.step_seconds), len(self.rates) - 1)]

    def count_by(self, t: float) -> float:
        """See Schedule.count_by."""
        t = min(max(t, 0.0), self.duration)
        total = 0.0
        for i, rate in enumerate(self.rates):
            start = i * self.step_seconds
            if t <= start:
                break
            total += rate * (min(t, start + self.step_seconds) - start)
        return total

    def time_of(self, n: float) -> float | None:
        """See Schedule.time_of."""
        done = 0.0
        for i, rate in enumerate(self.rates):
            in_step = rate * self.step_seconds
            if rate > 0 and n < done + in_step:
                t = i * self.step_seconds + (n - done) / rate
                return t if t < self.duration else None
            done += in_step
        return None

    def segments(self) -> tuple[Segment, ...]:
        """See Schedule.segments."""
        s = self.step_seconds
        return tuple(Segment(i * s, (i + 1) * s, r) for i, r in enumerate(self.rates))

    def describe(self) -> str:
        """See Schedule.describe."""
        return "step:" + ",".join(f"{r:g}" for r in self.rates) + f"@{self.step_seconds:g}"


@dataclass(frozen=True, slots=True)
class Ramp:
    """A rate rising (or falling) linearly from ``start_rate`` to ``end_rate``."""

    start_rate: float
    end_rate: float
    duration: float

    def _slope_half(self) -> float:
        return (self.end_rate - self.start_rate) / (2 * self.duration)

    def rate_at(self, t: float) -> float:
        """See Schedule.rate_at."""
        if not 0 <= t < self.duration:
            return 0.0
        return self.start_rate + (self.end_rate - self.start_rate) * t / self.duration

    def count_by(self, t: float) -> float:
        """See Schedule.count_by."""
        t = min(max(t, 0.0), self.duration)
        return self.start_rate * t + self._slope_half() * t * t

    def time_of(self, n: float) -> float | None:
        """See Schedule.time_of: the root of ``a t² + r0 t = n`` in its stable form."""
        a, r0 = self._slope_half(), self.start_rate
        disc = r0 * r0 + 4 * a * n
        if disc < 0:
            return None
        denom = r0 + math.sqrt(disc)
        if denom <= 0:
            return 0.0 if n == 0 else None
        t = 2 * n / denom
        return t if t < self.duration else None

    def segments(self) -> tuple[Segment, ...]:
        """See Schedule.segments: a ramp has no steady part."""
        return ()

    def describe(self) -> str:
        """See Schedule.describe."""
        return f"ramp:{self.start_rate:g}:{self.end_rate:g}"


def _number(text: str, spec: str) -> float:
    try:
        return _check_rate(float(text))
    except ValueError as exc:
        raise ScheduleError(f"schedule {spec!r}: {text!r} is not a rate >= 0") from exc


def parse_schedule(spec: str, duration: float) -> Schedule:
    """Build the schedule ``spec`` describes (see the module docstring)."""
    if not math.isfinite(duration) or duration <= 0:
        raise ScheduleError(f"duration {duration!r} must be > 0 seconds")
    kind, _, rest = spec.partition(":")
    if not rest:
        return Constant(_number(kind, spec), duration)
    if kind == "constant":
        return Constant(_number(rest, spec), duration)
    if kind == "step":
        rates_text, _, step_text = rest.partition("@")
        rates = tuple(_number(r, spec) for r in rates_text.split(",") if r.strip())
        if not rates:
            raise ScheduleError(f"schedule {spec!r}: no rates")
        step = float(step_text) if step_text else duration / len(rates)
        if step <= 0:
            raise ScheduleError(f"schedule {spec!r}: step length must be > 0")
        return Step(rates, step)
    if kind == "ramp":
        parts = rest.split(":")
        if len(parts) != 2:
            raise ScheduleError(f"schedule {spec!r}: use ramp:FROM:TO")
        return Ramp(_number(parts[0], spec), _number(parts[1], spec), duration)
    raise ScheduleError(f"schedule {spec!r}: unknown kind {kind!r} (constant, step, ramp)")
