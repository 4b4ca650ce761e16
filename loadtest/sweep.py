"""Rate ladders and what the bench reads off them.

A ladder is a step schedule of rising rates; the runner stops it once the target
saturates. Each step is judged on its intervals after the first (warm-up), see
``loadtest.report.steps``: *sustained* means no errors and at least 95 % of the offered
rate delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def geometric(start: float, factor: float, top: float) -> list[float]:
    """``start``, ``start*factor``, ... while <= ``top`` (rounded to whole envelopes/s)."""
    if start <= 0 or factor <= 1:
        raise ValueError("a ladder needs start > 0 and factor > 1")
    rates: list[float] = []
    rate = start
    while rate <= top:
        rates.append(float(round(rate)))
        rate *= factor
    return rates


def step_spec(rates: Sequence[float], step_s: float) -> str:
    """The ``--schedule`` string of a ladder."""
    return "step:" + ",".join(f"{r:g}" for r in rates) + f"@{step_s:g}"


def highest_within(steps: Sequence[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The highest-rate step that was sustained with p99 <= ``p99_ms`` (None if none was)."""
    ok = [s for s in steps if s["sustained"] and s["latency_ms"]["p99"] <= p99_ms]
    return max(ok, key=lambda s: s["rate"]) if ok else None


def saturation(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The step that delivered the most envelopes per second."""
    return max(steps, key=lambda s: s["delivered_per_s"]) if steps else None


def brief(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps reduced to rate, delivered/s, p50/p99/max and the verdict (for the results)."""
    return [
        {
            "rate": s["rate"],
            "delivered_per_s": s["delivered_per_s"],
            "p50_ms": s["latency_ms"]["p50"],
            "p99_ms": s["latency_ms"]["p99"],
            "max_ms": s["latency_ms"]["max"],
            "errors": s["errors"],
            "sustained": s["sustained"],
        }
        for s in steps
    ]
