"""The report of a run: a JSON-ready dict, and the table printed at the end."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from loadtest.latency import merged
from loadtest.machine import machine, now_iso, versions
from loadtest.runner import IntervalTotals, LoadResult, window_intervals

#: Keys every JSON report has (the smoke test checks them).
REPORT_KEYS = (
    "ok",
    "verdict",
    "date",
    "config",
    "machine",
    "versions",
    "setup",
    "throughput",
    "totals",
    "latency_ms",
    "spectrum",
    "errors",
    "reconciliation",
    "intervals",
    "steps",
    "generator",
    "failover",
)
#: A generator worker busier than this share of its core during the load is saturated.
GENERATOR_BUSY_SHARE = 0.9
#: ... and so is one whose batches left later than this (p99, ms) after their intended time.
GENERATOR_LAG_MS = 5.0
#: An interval counts as sustained when it delivered at least this share of the offer.
SUSTAINED_SHARE = 0.95


def _interval_row(result: LoadResult, t: IntervalTotals, offered: float) -> dict[str, Any]:
    i = result.cfg.interval_s
    return {
        "t_s": round((t.index + 1) * i, 3),
        "offered_per_s": round(offered / i, 1),
        "sent_per_s": round(t.sent / i, 1),
        "acked_per_s": round(t.acked / i, 1),
        "delivered_per_s": round(t.delivered / i, 1),
        "errors": sum(t.errors.values()),
        "latency_ms": t.live.summary(),
    }


def offered_in(result: LoadResult, index: int) -> float:
    """Envelopes the schedule asked for in interval ``index`` (within the load window)."""
    i = result.cfg.interval_s
    s = result.schedule
    end = min((index + 1) * i, result.window_s)
    return max(0.0, s.count_by(end) - s.count_by(index * i))


def steps(result: LoadResult) -> list[dict[str, Any]]:
    """One summary per steady segment, skipping each segment's first interval (warm-up)."""
    i = result.cfg.interval_s
    out = []
    for seg in result.schedule.segments():
        if seg.start >= result.window_s:
            break
        inside = [
            t
            for t in result.intervals
            if t.index * i >= seg.start - 1e-9
            and (t.index + 1) * i <= min(seg.end, result.window_s) + 1e-9
        ]
        if len(inside) > 1:
            inside = inside[1:]
        if not inside:
            continue
        span = len(inside) * i
        hist = merged([t.live for t in inside])
        delivered = sum(t.delivered for t in inside) / span
        acked = sum(t.acked for t in inside) / span
        errors = sum(sum(t.errors.values()) for t in inside)
        out.append(
            {
                "start_s": seg.start,
                "end_s": seg.end,
                "rate": seg.rate,
                "delivered_per_s": round(delivered, 1),
                "acked_per_s": round(acked, 1),
                "errors": errors,
                "latency_ms": hist.summary(),
                "sustained": errors == 0
                and result.cfg.progress(delivered, acked) >= SUSTAINED_SHARE * seg.rate,
            }
        )
    return out


def generator(result: LoadResult) -> dict[str, Any]:
    """How hard the generator itself worked, and whether that may have bent the figures."""
    lag = result.send_lag.summary()
    share = result.generator_load_cpu_share
    return {
        "workers": result.cfg.workers,
        "cpus": list(result.cfg.cpus),
        "cpu_s": round(result.generator_cpu_s, 3),
        "load_cpu_share": round(share, 3),
        "send_lag_ms": lag,
        "gc_max_pause_ms": result.generator_gc_max_pause_ms,
        # A busy or late generator still measures from intended times, but its own delays
        # then count as latency: such figures are a bound on the server, not its value.
        "saturated": share >= GENERATOR_BUSY_SHARE or lag["p99"] > GENERATOR_LAG_MS,
    }


def build(result: LoadResult) -> dict[str, Any]:
    """The JSON report of ``result``."""
    cfg, recon = result.cfg, result.reconciliation
    window = window_intervals(result)
    span = max(len(window) * cfg.interval_s, 1e-9)
    offered = recon.sent + recon.unsent
    config = dataclasses.asdict(cfg)
    config["schedule"] = result.schedule.describe()
    return {
        "ok": recon.ok,
        "verdict": recon.verdict(),
        "date": now_iso(),
        "config": config,
        "machine": machine(),
        "versions": versions(),
        "setup": {
            "register_s": round(result.register_s, 3),
            "connect_s": round(result.connect_s, 3),
            "streams": result.streams,
        },
        "window_s": result.window_s,
        "stopped_early": result.stopped_early,
        "drain_complete": result.drain_complete,
        "throughput": {
            "offered_per_s": round(offered / result.window_s, 1),
            "sent_per_s": round(sum(t.sent for t in window) / span, 1),
            "acknowledged_per_s": round(sum(t.acked for t in window) / span, 1),
            "delivered_per_s": round(sum(t.delivered for t in window) / span, 1),
        },
        "totals": {
            "offered": offered,
            "sent": recon.sent,
            "acknowledged": recon.acknowledged,
            "delivered": sum(t.delivered for t in result.intervals),
            "rejected": recon.rejected,
        },
        "latency_ms": {
            "live": result.live.summary(),
            "store_and_forward": result.drained.summary(),
            "send_to_answer": result.answer.summary(),
        },
        "spectrum": [[p, round(ms, 3)] for p, ms in result.live.spectrum()],
        "errors": dict(sorted(result.errors.items())),
        "reconciliation": recon.as_dict(),
        "intervals": [
            _interval_row(result, t, offered_in(result, t.index)) for t in result.intervals
        ],
        "steps": steps(result),
        "generator": generator(result),
        "failover": result.failover,
        "wall_s": round(result.wall_s, 3),
        "notes": result.notes,
    }


def _fmt(v: float) -> str:
    return f"{v:10.2f}" if math.isfinite(v) else "       n/a"


def table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    c, th, tot = report["config"], report["throughput"], report["totals"]
    g = report["generator"]
    lines = [
        f"schedule {c['schedule']} for {report['window_s']:g} s"
        + (" (stopped at saturation)" if report["stopped_early"] else ""),
        f"{c['devices']} devices ({c['offline_fraction']:.0%} offline) over "
        f"{c['connections']} connections, {c['workers']} worker(s), batch {c['batch']}, "
        f"fanout {c['fanout']}, payload {c['payload_bytes']} B, targets {', '.join(c['targets'])}",
        "",
        f"{'':16}{'envelopes':>12}{'per s':>12}",
    ]
    for name, total, rate in (
        ("offered", tot["offered"], th["offered_per_s"]),
        ("sent", tot["sent"], th["sent_per_s"]),
        ("acknowledged", tot["acknowledged"], th["acknowledged_per_s"]),
        ("delivered", tot["delivered"], th["delivered_per_s"]),
    ):
        lines.append(f"  {name:14}{total:12d}{rate:12.0f}")
    lines += [
        "",
        f"{'latency (ms)':16}"
        + "".join(f"{h:>10}" for h in ("p50", "p90", "p99", "p99.9", "max"))
        + f"{'count':>10}",
    ]
    for name, key in (
        ("live", "live"),
        ("store & fwd", "store_and_forward"),
        ("send->answer", "send_to_answer"),
    ):
        s = report["latency_ms"][key]
        cells = "".join(_fmt(s[k]) for k in ("p50", "p90", "p99", "p999", "max"))
        lines.append(f"  {name:14}{cells}{s['count']:10d}")
    errors = report["errors"]
    lines += [
        "",
        "errors: " + (", ".join(f"{k}={v}" for k, v in errors.items()) if errors else "none"),
        f"generator: {g['load_cpu_share']:.0%} of a core during the load, send lag p99 "
        f"{g['send_lag_ms']['p99']:.2f} ms, longest GC pause {g['gc_max_pause_ms']:.1f} ms"
        + (" - SATURATED: its own delays count as latency" if g["saturated"] else ""),
    ]
    f = report.get("failover") or {}
    if f.get("streams_lost"):
        r = f["reconnect_ms"]
        lines.append(
            f"failover: {f['streams_lost']} streams lost, {f['reconnected']} devices back in "
            f"p50 {r['p50']:.0f} / p99 {r['p99']:.0f} / max {r['max']:.0f} ms "
            f"({f['failed_attempts']} failed attempts, {f['gave_up']} gave up), "
            f"{f['stored_meanwhile']} envelopes stored meanwhile"
        )
    lines.append(report["verdict"])
    for m in report["reconciliation"]["missing_examples"]:
        lines.append(
            f"  missing {m['message_id']} worker {m['worker']} seq {m['seq']} to {m['recipient']} "
            f"intended at {m['intended_offset_ms']} ms"
        )
    return "\n".join(lines)
