"""What the coordinator and its worker processes say to each other (over a Pipe).

Sequence per worker: (worker) Ready -> (coordinator) Go -> (worker) Interval... ->
(coordinator, optional) Stop -> (worker) SendDone -> (coordinator) Drain -> (worker)
Interval... -> (worker) Result. A worker that fails sends Failed and exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker registered its devices and opened the online ones' streams."""

    worker: int
    #: Global device index -> (user, device number) as the key directory assigned it.
    addresses: dict[int, tuple[str, int]]
    register_s: float
    connect_s: float
    streams: int


@dataclass(frozen=True, slots=True)
class Go:
    """Every device's address, and when the schedule starts (CLOCK_MONOTONIC ns)."""

    addresses: list[tuple[str, int]]
    start_ns: int


@dataclass(frozen=True, slots=True)
class Interval:
    """Counters of one reporting interval of one worker (by receipt/answer time)."""

    worker: int
    index: int
    sent: int
    acked: int
    delivered: int
    errors: dict[str, int]
    #: Encoded HdrHistogram of live deliveries received in the interval.
    histogram: bytes


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the schedule now (the coordinator saw saturation)."""


@dataclass(frozen=True, slots=True)
class SendDone:
    """The schedule ended and every answer came in (or the wait timed out)."""

    worker: int
    #: Acknowledged envelopes per receiving worker (what each must see delivered).
    acknowledged_to: list[int]
    #: CPU seconds the worker used from Go to the end of the schedule.
    load_cpu_s: float
    #: Wall seconds of the same span.
    load_wall_s: float
    #: Sequences of this worker's envelopes without an answer (their stream ended), per
    #: receiving worker: they may or may not arrive, so they do not count for the drain.
    unanswered_to: dict[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Drain:
    """Bring every device online and wait for ``expected`` unique deliveries.

    Deliveries of ``unanswered`` envelopes (sender worker -> sequences) do not count
    towards ``expected``: an unanswered envelope may arrive, but need not.
    """

    expected: int
    unanswered: dict[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failover:
    """Streams of one worker that ended on their own, and how their devices came back.

    A device whose stream ends (its node died, or the call failed) reconnects as the SDK
    does: to the next target in order, with full-jitter exponential backoff between tries.
    """

    #: Streams that ended on their own during the run.
    lost: int = 0
    #: Devices back on a target (a new session, possibly on another node).
    reconnected: int = 0
    #: Devices no target took within the deadline.
    failed: int = 0
    #: Connection attempts that failed before the one that succeeded (dead targets).
    failed_attempts: int = 0
    #: Encoded Histogram (us): stream lost -> Ready on the next session.
    reconnect: bytes = b""
    #: Envelopes that reached a failed-over device on its new session with an intended
    #: send time between the loss and that session's Ready: they waited in the store.
    stored_meanwhile: int = 0
    #: "from->to" target indices of the reconnected devices, and how many took each way.
    moves: dict[str, int] = field(default_factory=dict)
    #: Why streams ended ("CODE: details", a few distinct ones), and how often.
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """Everything the worker measured, for the report and the reconciliation."""

    worker: int
    status: bytes
    recipients: bytes
    received: dict[int, bytes]
    unexpected: int
    drained: bytes
    answer: bytes
    #: How late batches left compared with their intended time (encoded histogram).
    send_lag: bytes
    #: The worker's longest garbage-collection pause (ms).
    gc_max_pause_ms: float
    errors: dict[str, int]
    totals: dict[str, int]
    cpu_s: float
    drain_complete: bool
    notes: list[str] = field(default_factory=list)
    failover: Failover = field(default_factory=Failover)


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker failed; ``error`` is its traceback."""

    worker: int
    error: str
