"""Per-interval counters of one worker, swapped out and shipped at each boundary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loadtest.latency import Histogram
from loadtest.messages import Interval


@dataclass
class IntervalCounters:
    """What happened in one interval (events are counted when they are observed)."""

    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    live: Histogram = field(default_factory=Histogram)

    def message(self, worker: int, index: int) -> Interval:
        """The Interval message for the coordinator."""
        return Interval(
            worker=worker,
            index=index,
            sent=self.sent,
            acked=self.acked,
            delivered=self.delivered,
            errors=dict(self.errors),
            histogram=self.live.encode(),
        )
