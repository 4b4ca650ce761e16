"""The coordinating process: starts the workers, drives the phases, gathers the results.

Every wait is bounded: setup by ``setup_timeout_s``, the run by its duration plus two
drain timeouts plus a margin; past a deadline the workers are terminated and the run
fails with the reason.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from loadtest import messages as msg
from loadtest.config import LoadConfig
from loadtest.latency import Histogram
from loadtest.ledger import MissingEnvelope, Reconciliation, SendRecord, reconcile
from loadtest.prom import PromExporter
from loadtest.schedule import Schedule
from loadtest.wire import message_id
from loadtest.worker import worker_main

#: Seconds between Go and the first intended send (time for every worker to see Go).
START_MARGIN_S = 0.25
#: Seconds of consecutive saturated intervals (at least two) that stop a
#: ``stop_on_saturation`` run.
SATURATED_SECONDS = 1.0


class RunError(RuntimeError):
    """The run could not be carried out (a worker failed, or a deadline passed)."""


@dataclass
class IntervalTotals:
    """One interval summed over the workers."""

    index: int
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    live: Histogram = field(default_factory=Histogram)
    reported: int = 0

    def add(self, m: msg.Interval) -> None:
        """Add one worker's counters."""
        self.sent += m.sent
        self.acked += m.acked
        self.delivered += m.delivered
        self.errors.update(m.errors)
        self.live.add_encoded(m.histogram)
        self.reported += 1


@dataclass
class LoadResult:
    """Everything a run measured (``loadtest.report`` turns it into the report)."""

    cfg: LoadConfig
    schedule: Schedule
    intervals: list[IntervalTotals]
    live: Histogram
    drained: Histogram
    answer: Histogram
    reconciliation: Reconciliation
    errors: Counter[str]
    window_s: float
    stopped_early: bool
    drain_complete: bool
    register_s: float
    connect_s: float
    streams: int
    generator_cpu_s: float
    #: Busiest worker's CPU share (of one core) from Go to the end of the schedule.
    generator_load_cpu_share: float
    #: CPU seconds of all workers from Go to the end of the schedule.
    generator_load_cpu_s: float
    send_lag: Histogram
    generator_gc_max_pause_ms: float
    wall_s: float
    notes: list[str]
    #: Devices whose stream ended on their own, and how they came back (see
    #: ``failover_summary``).
    failover: dict[str, Any] = field(default_factory=dict)


class Coordinator:
    """Runs one load test: ``Coordinator(cfg).run()``."""

    def __init__(
        self,
        cfg: LoadConfig,
        *,
        on_ready: Callable[[], None] | None = None,
        on_load_end: Callable[[], None] | None = None,
        on_interval: Callable[[IntervalTotals], None] | None = None,
        out: TextIO | None = None,
    ) -> None:
        """``on_ready``: called once every stream is open, before the schedule starts;
        ``on_load_end``: called when the schedule is over and answered, before the drain;
        ``on_interval``: called with each interval once every worker reported it (a
        failure drill kills a node from there, e.g. once enough envelopes were acked).
        """
        self.cfg = cfg.validate()
        self.schedule = cfg.parsed_schedule()
        self.on_ready = on_ready
        self.on_load_end = on_load_end
        self.on_interval = on_interval
        self.out = out if out is not None else sys.stderr
        self.run_tag = os.urandom(4)
        self.intervals: dict[int, IntervalTotals] = {}
        self.completed = 0
        self.cumulative = Histogram()
        self.errors: Counter[str] = Counter()
        self.stopped_at: float | None = None
        self._low_streak = 0
        self._load_share = 0.0
        self._load_cpu = 0.0
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        self._prom: PromExporter | None = None

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (once started)."""
        return [int(p.pid) for p in self._procs if p.pid is not None]

    def run(self) -> LoadResult:
        """Start the workers, run every phase, and return the result."""
        cfg = self.cfg
        t0 = time.monotonic()
        ctx = mp.get_context("spawn")
        if cfg.prometheus_port:
            self._prom = PromExporter(cfg.prometheus_port)
        try:
            for w in range(cfg.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=worker_main, args=(cfg, w, self.run_tag, child), daemon=True
                )
                proc.start()
                child.close()
                self._pipes.append(parent)
                self._procs.append(proc)
            return self._phases(t0)
        finally:
            self._shutdown()

    def _phases(self, t0: float) -> LoadResult:
        cfg = self.cfg
        setup_deadline = time.monotonic() + cfg.setup_timeout_s
        readies = self._gather(msg.Ready, setup_deadline)
        addresses: list[tuple[str, int]] = [("", 0)] * cfg.devices
        for ready in readies.values():
            for d, addr in ready.addresses.items():
                addresses[d] = addr
        self._say(
            f"setup: {cfg.devices} devices registered in "
            f"{max(r.register_s for r in readies.values()):.1f} s, "
            f"{sum(r.streams for r in readies.values())} streams open in "
            f"{max(r.connect_s for r in readies.values()):.1f} s"
        )
        if self.on_ready is not None:
            self.on_ready()
        start_ns = time.monotonic_ns() + int(START_MARGIN_S * 1e9)
        for pipe in self._pipes:
            pipe.send(msg.Go(addresses, start_ns))
        run_deadline = (
            time.monotonic() + START_MARGIN_S + self.schedule.duration + cfg.drain_timeout_s + 60
        )
        done = self._gather(msg.SendDone, run_deadline)
        window = min(self.schedule.duration, self.stopped_at or self.schedule.duration)
        if self.on_load_end is not None:
            self.on_load_end()
        self._load_share = max(d.load_cpu_s / max(d.load_wall_s, 1e-9) for d in done.values())
        self._load_cpu = sum(d.load_cpu_s for d in done.values())
        for w, pipe in enumerate(self._pipes):
            expected = sum(d.acknowledged_to[w] for d in done.values())
            unanswered = {s: d.unanswered_to[w] for s, d in done.items() if w in d.unanswered_to}
            pipe.send(msg.Drain(expected, unanswered))
        results = self._gather(msg.Result, time.monotonic() + cfg.drain_timeout_s * 2 + 60)
        for proc in self._procs:
            proc.join(10)
        return self._result(readies, results, window, time.monotonic() - t0)

    def _gather(self, kind: type[Any], deadline: float) -> dict[int, Any]:
        got: dict[int, Any] = {}
        while len(got) < len(self._pipes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(
                    f"timed out waiting for {kind.__name__} from workers "
                    f"{sorted(set(range(len(self._pipes))) - set(got))}"
                )
            # A worker that already answered may exit (EOF on its pipe): wait on the others.
            waiting = [p for w, p in enumerate(self._pipes) if w not in got]
            for pipe in wait(waiting, timeout=left):
                assert isinstance(pipe, Connection)
                try:
                    message = pipe.recv()
                except EOFError as exc:
                    raise RunError("a worker exited without reporting") from exc
                if isinstance(message, msg.Failed):
                    raise RunError(f"worker {message.worker} failed:\n{message.error}")
                if isinstance(message, msg.Interval):
                    self._interval(message)
                elif isinstance(message, kind):
                    got[message.worker] = message
                else:
                    raise RunError(f"unexpected {type(message).__name__} from a worker")
        return got

    def _interval(self, m: msg.Interval) -> None:
        totals = self.intervals.setdefault(m.index, IntervalTotals(m.index))
        totals.add(m)
        self.errors.update(m.errors)
        while (
            self.completed in self.intervals
            and self.intervals[self.completed].reported == self.cfg.workers
        ):
            self._completed(self.intervals[self.completed])
            self.completed += 1

    def offered_in(self, index: int) -> float:
        """Envelopes the schedule asked for in interval ``index``."""
        i = self.cfg.interval_s
        end = (index + 1) * i
        if self.stopped_at is not None:
            end = min(end, self.stopped_at)
        return max(0.0, self.schedule.count_by(end) - self.schedule.count_by(index * i))

    def _completed(self, t: IntervalTotals) -> None:
        cfg = self.cfg
        self.cumulative.add(t.live)
        offered = self.offered_in(t.index)
        i = cfg.interval_s
        p = {"p50": t.live.percentile_ms(50), "p99": t.live.percentile_ms(99)}
        if self._prom is not None:
            self._prom.update(
                offered_rate=offered / i,
                sent=t.sent,
                acked=t.acked,
                delivered=t.delivered,
                errors=dict(t.errors),
                percentiles_ms=p,
            )
        phase = "load " if (t.index + 1) * i <= self.schedule.duration + 1e-9 else "drain"
        self._say(
            f"[{phase} {(t.index + 1) * i:6.1f}s] offered {offered / i:8.0f}/s "
            f"sent {t.sent / i:8.0f}/s acked {t.acked / i:8.0f}/s "
            f"delivered {t.delivered / i:8.0f}/s | p99 {p['p99']:8.2f} ms "
            f"max {t.live.max_ms():8.2f} ms | so far p99 "
            f"{self.cumulative.percentile_ms(99):8.2f} ms | errors {sum(t.errors.values())}"
        )
        self._check_saturation(t, offered)
        if self.on_interval is not None:
            self.on_interval(t)

    def _check_saturation(self, t: IntervalTotals, offered: float) -> None:
        cfg = self.cfg
        if not cfg.stop_on_saturation or self.stopped_at is not None or offered <= 0:
            return
        low = cfg.progress(t.delivered, t.acked) < cfg.saturation_ratio * offered
        slow = t.live.percentile_ms(99) > cfg.stop_p99_ms
        self._low_streak = self._low_streak + 1 if (low or slow or t.errors) else 0
        if self._low_streak >= max(2, math.ceil(SATURATED_SECONDS / cfg.interval_s - 1e-9)):
            self.stopped_at = (t.index + 1) * cfg.interval_s
            self._say(f"saturated at {self.stopped_at:.1f} s: stopping the schedule")
            for pipe in self._pipes:
                pipe.send(msg.Stop())

    def _result(
        self,
        readies: dict[int, msg.Ready],
        results: dict[int, msg.Result],
        window: float,
        wall: float,
    ) -> LoadResult:
        cfg = self.cfg
        # Intervals still incomplete (a worker's last partial one) are folded in as they are.
        for index in sorted(k for k in self.intervals if k >= self.completed):
            self._completed(self.intervals[index])
        records = {
            w: SendRecord(bytearray(r.status), _uint32_array(r.recipients))
            for w, r in results.items()
        }
        drained, answer, lag = Histogram(), Histogram(), Histogram()
        notes: list[str] = []
        for r in results.values():
            drained.add_encoded(r.drained)
            answer.add_encoded(r.answer)
            lag.add_encoded(r.send_lag)
            self.errors.update(r.errors)
            notes += [f"worker {r.worker}: {n}" for n in r.notes]
        recon = reconcile(
            records,
            [r.received for r in results.values()],
            unexpected=sum(r.unexpected for r in results.values()),
            describe=self._describer(records, readies),
        )
        ordered = [self.intervals[k] for k in sorted(self.intervals)]
        return LoadResult(
            cfg=cfg,
            schedule=self.schedule,
            intervals=ordered,
            live=self.cumulative,
            drained=drained,
            answer=answer,
            reconciliation=recon,
            errors=self.errors,
            window_s=window,
            stopped_early=self.stopped_at is not None,
            drain_complete=all(r.drain_complete for r in results.values()),
            register_s=max(r.register_s for r in readies.values()),
            connect_s=max(r.connect_s for r in readies.values()),
            streams=sum(r.streams for r in readies.values()),
            generator_cpu_s=sum(r.cpu_s for r in results.values()),
            generator_load_cpu_share=self._load_share,
            generator_load_cpu_s=self._load_cpu,
            send_lag=lag,
            generator_gc_max_pause_ms=max(r.gc_max_pause_ms for r in results.values()),
            wall_s=wall,
            notes=notes,
            failover=failover_summary([r.failover for r in results.values()]),
        )

    def _describer(
        self, records: dict[int, SendRecord], readies: dict[int, msg.Ready]
    ) -> Callable[[int, int, int], MissingEnvelope]:
        cfg = self.cfg
        addresses: dict[int, tuple[str, int]] = {}
        for ready in readies.values():
            addresses.update(ready.addresses)

        def describe(worker: int, seq: int, recipient: int) -> MissingEnvelope:
            j = seq // cfg.batch
            offset = self.schedule.time_of((j * cfg.workers + worker) * cfg.batch)
            user, device = addresses.get(recipient, ("?", 0))
            return MissingEnvelope(
                worker=worker,
                seq=seq,
                recipient=f"{cfg.tenant}/{user}/{device} (device #{recipient})",
                intended_offset_ms=None if offset is None else round(offset * 1000, 3),
                message_id=message_id(self.run_tag, worker, seq).hex(),
            )

        return describe

    def _say(self, line: str) -> None:
        if not self.cfg.quiet:
            print(line, file=self.out, flush=True)

    def _shutdown(self) -> None:
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self._pipes:
            pipe.close()
        if self._prom is not None:
            self._prom.close()


def failover_summary(parts: list[msg.Failover]) -> dict[str, Any]:
    """The workers' failover records as one JSON-ready summary.

    ``reconnect_ms``: per reconnected device, stream lost -> Ready on its new session
    (p50/p99/max over devices); ``stored_meanwhile``: envelopes those devices received
    on their new session that were sent while they were away (so went through the store).
    """
    hist = Histogram()
    moves: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for part in parts:
        if part.reconnect:
            hist.add_encoded(part.reconnect)
        moves.update(part.moves)
        reasons.update(part.reasons)
    return {
        "streams_lost": sum(p.lost for p in parts),
        "reconnected": sum(p.reconnected for p in parts),
        "gave_up": sum(p.failed for p in parts),
        "failed_attempts": sum(p.failed_attempts for p in parts),
        "reconnect_ms": hist.summary(),
        "stored_meanwhile": sum(p.stored_meanwhile for p in parts),
        "moves": dict(sorted(moves.items())),
        "reasons": dict(reasons.most_common()),
    }


def _uint32_array(data: bytes) -> array[int]:
    out = array("I")
    out.frombytes(data)
    return out


def window_intervals(result: LoadResult) -> list[IntervalTotals]:
    """The intervals inside the load window (the schedule, not the drain)."""
    n = max(1, math.floor(result.window_s / result.cfg.interval_s + 1e-9))
    return [t for t in result.intervals if t.index < n]
