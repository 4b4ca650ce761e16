"""A PNG of a run: latency and throughput over time, and the latency percentile spectrum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

#: Tick positions of the spectrum's x axis: percentile -> label.
SPECTRUM_TICKS = {
    0.0: "0%",
    90.0: "90%",
    99.0: "99%",
    99.9: "99.9%",
    99.99: "99.99%",
    99.999: "99.999%",
}


def _x_of(percentile: float) -> float:
    """The spectrum's x axis: 1 / (1 - p), so each extra nine takes the same width."""
    return 1.0 / max(1e-6, 1.0 - percentile / 100.0)


def write_png(report: dict[str, Any], path: Path) -> Path:
    """Draw ``report`` (as built by ``loadtest.report.build``) into ``path``."""
    fig, (over_time, spectrum) = plt.subplots(2, 1, figsize=(10, 9))
    rows = report["intervals"]
    t = [r["t_s"] for r in rows]
    for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        over_time.plot(t, [r["latency_ms"][key] or float("nan") for r in rows], style, label=key)
    over_time.set_yscale("log")
    over_time.set_xlabel("time since start (s), by receipt")
    over_time.set_ylabel("latency from intended send (ms)")
    over_time.grid(True, which="both", alpha=0.3)
    rates = over_time.twinx()
    rates.plot(t, [r["offered_per_s"] for r in rows], "k--", alpha=0.5, label="offered/s")
    rates.plot(t, [r["delivered_per_s"] for r in rows], "g-", alpha=0.5, label="delivered/s")
    rates.set_ylabel("envelopes/s")
    rates.set_ylim(bottom=0)
    handles = over_time.get_legend_handles_labels()
    more = rates.get_legend_handles_labels()
    over_time.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    c = report["config"]
    schedule = c["schedule"] if len(c["schedule"]) <= 40 else c["schedule"][:37] + "..."
    over_time.set_title(
        f"{schedule}, {c['devices']} devices, batch {c['batch']}: {report['verdict'][:50]}",
        fontsize=9,
    )
    points = report["spectrum"]
    if points:
        spectrum.plot([_x_of(p) for p, _ in points], [ms for _, ms in points], "o-")
    spectrum.set_xscale("log")
    if points and min(ms for _, ms in points) > 0:
        spectrum.set_yscale("log")
    spectrum.set_xticks([_x_of(p) for p in SPECTRUM_TICKS], list(SPECTRUM_TICKS.values()))
    spectrum.set_xlabel("percentile")
    spectrum.set_ylabel("latency (ms)")
    spectrum.set_title("latency by percentile (live deliveries, whole run)", fontsize=9)
    spectrum.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
