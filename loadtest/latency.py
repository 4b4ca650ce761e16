"""Latency recording with HdrHistogram (the ``hdrhistogram`` package), typed.

Values are microseconds from 1 µs to one hour at 3 significant digits, so every reported
percentile is within 0.1 % of the recorded value. Histograms travel between processes in
HdrHistogram's compressed base64 form and are added together exactly.
"""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_DIGITS = 3
#: Percentiles of the report (p50, p90, p99, p99.9).
REPORTED = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))
#: Percentiles of the spectrum plot and the JSON ``spectrum``.
SPECTRUM = (
    0.0,
    10.0,
    25.0,
    50.0,
    75.0,
    90.0,
    95.0,
    99.0,
    99.5,
    99.9,
    99.95,
    99.99,
    99.999,
    100.0,
)


class Histogram:
    """Latencies in microseconds; percentiles come out in milliseconds."""

    def __init__(self, encoded: str | bytes | None = None) -> None:
        if encoded:
            self._h: Any = HdrHistogram.decode(encoded)
        else:
            self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)

    def record_us(self, value: int, count: int = 1) -> None:
        """Record ``value`` µs ``count`` times (clamped into the trackable range)."""
        self._h.record_value(min(max(value, 0), HIGHEST_US), count)

    def add(self, other: Histogram) -> None:
        """Add every value of ``other``."""
        if other.count:
            self._h.add(other._h)

    def add_encoded(self, encoded: str | bytes) -> None:
        """Add a histogram in its encoded form."""
        self.add(Histogram(encoded))

    def encode(self) -> bytes:
        """Compressed base64 form (HdrHistogram's V2 encoding)."""
        return bytes(self._h.encode())

    @property
    def count(self) -> int:
        """Values recorded."""
        return int(self._h.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        """Value at ``percentile`` (0..100) in ms; 0 when empty."""
        if not self.count:
            return 0.0
        return float(self._h.get_value_at_percentile(percentile)) / 1000

    def max_ms(self) -> float:
        """Largest value in ms (HdrHistogram's highest equivalent value)."""
        return float(self._h.get_max_value()) / 1000 if self.count else 0.0

    def summary(self) -> dict[str, float | int]:
        """``count``, ``p50``, ``p90``, ``p99``, ``p999`` and ``max`` (ms)."""
        out: dict[str, float | int] = {"count": self.count}
        for name, pct in REPORTED:
            out[name] = round(self.percentile_ms(pct), 3)
        out["max"] = round(self.max_ms(), 3)
        return out

    def spectrum(self) -> list[tuple[float, float]]:
        """(percentile, ms) pairs along :data:`SPECTRUM`, up to what was recorded."""
        if not self.count:
            return []
        return [(p, self.percentile_ms(p)) for p in SPECTRUM]


def merged(parts: list[Histogram]) -> Histogram:
    """A new histogram holding every value of ``parts``."""
    out = Histogram()
    for part in parts:
        out.add(part)
    return out
