"""One worker process: its devices, their streams, its share of the schedule.

Worker ``w`` of ``W`` holds devices ``d`` with ``d % W == w``: it registers them, opens
the online ones' streams over its channels, sends its share of the batches from those
streams, receives and acks what is delivered to them, and at the drain brings the
others online. See ``loadtest.messages`` for the conversation with the coordinator.

Failover: a stream that ends on its own (its node was killed, the call failed) is
reconnected as the SDK does (``relay.sdk.client``): to the next target in order, after
a full-jitter exponential backoff (``relay.sdk.backoff``), trying target after target
until one completes the handshake. The new session replaces the old one for sending and
receiving; its deliveries count as store-and-forward (they include what waited while
the device was away). A device that no target takes is counted, never fatal: the run
still reconciles and reports. Devices connected at the drain dial their home target
first and fail over the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import traceback
from collections import defaultdict
from collections.abc import Coroutine
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import grpc

from loadtest import messages as msg
from loadtest.config import LoadConfig
from loadtest.devices import (
    HANDSHAKE_TIMEOUT_S,
    HandshakeError,
    Identity,
    handshake,
    open_call,
    register_all,
)
from loadtest.intervals import IntervalCounters
from loadtest.latency import Histogram
from loadtest.receiver import Receiver
from loadtest.streams import DeviceStream
from loadtest.traffic import Sender
from loadtest.wire import BatchEncoder, encode_address
from relay.common.tls import secure_or_plain_channel
from relay.sdk.backoff import ExponentialBackoff
from relaypb.relay.v1 import relay_pb2

M = TypeVar("M")
#: gc thresholds during the load: young collections only (older ones after 10^7 objects).
LOAD_GC_THRESHOLDS = (10_000, 1_000, 1_000)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Each channel its own TCP connection: no sharing of subchannels between channels.
    ("grpc.use_local_subchannel_pool", 1),
]
#: Longest wait between two reconnect attempts of a failed-over device (the SDK's
#: backoff, full jitter from 0.2 s doubling, capped lower so a drill measures the relay).
FAILOVER_BACKOFF_CAP_S = 2.0
#: Longest handshake of a reconnect attempt before the next target is tried.
FAILOVER_HANDSHAKE_TIMEOUT_S = 5.0
#: Distinct reasons for lost streams kept for the report (and characters of each).
MAX_REASONS, MAX_REASON_CHARS = 10, 160
#: Handshake failures worth another target (as the SDK's ``is_retryable``); any other
#: (a refused key, a protocol error) is the generator's or the setup's fault: no retry.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class NoTarget(RuntimeError):
    """No target completed a device's handshake in time (the message says why)."""


class Worker:
    """The asyncio side of a worker process (a StreamSink for its streams)."""

    def __init__(self, cfg: LoadConfig, index: int, run_tag: bytes, conn: Connection) -> None:
        self.cfg = cfg
        self.index = index
        self.run_tag = run_tag
        self.conn = conn
        self.counters = IntervalCounters()
        self.receiver = Receiver(run_tag, lambda: self.counters)
        self.sender: Sender | None = None
        self.streams: dict[int, DeviceStream] = {}
        self.identities: dict[int, Identity] = {}
        self.channels: dict[int, list[grpc.aio.Channel]] = {}
        self.stop = asyncio.Event()
        self.closed_errors: defaultdict[str, int] = defaultdict(int)
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._interval = 0
        self._start_ns = 0
        self._gate = asyncio.Semaphore(cfg.connect_concurrency)
        self._reconnects: dict[int, asyncio.Task[None]] = {}
        self._closing = False
        self._lost = 0
        self._failed = 0
        self._failed_attempts = 0
        self._reconnect = Histogram()
        self._moves: defaultdict[str, int] = defaultdict(int)
        self._reasons: defaultdict[str, int] = defaultdict(int)
        self.gc_pauses = GcPauses()
        gc.callbacks.append(self.gc_pauses.on_gc)

    # StreamSink --------------------------------------------------------------------
    def on_deliver(self, stream: DeviceStream, envelopes: Any) -> None:
        """See StreamSink."""
        self.receiver.on_deliver(stream, envelopes)

    def on_results(self, stream: DeviceStream, results: relay_pb2.SendResults) -> None:
        """See StreamSink."""
        if self.sender is not None:
            self.sender.on_results(results)

    def on_queue_empty(self, stream: DeviceStream) -> None:
        """See StreamSink."""

    def on_closed(self, stream: DeviceStream, error: str) -> None:
        """See StreamSink: count the error, fail the stream's unanswered batches, and
        fail the device over to the next target."""
        self.counters.errors[f"STREAM_{error}"] += 1
        if self.sender is not None:
            self.sender.on_stream_closed(stream)
        d = stream.identity.index
        if self._closing or self.streams.get(d) is not stream or d in self._reconnects:
            return
        self._lost += 1
        reason = f"{error}: {stream.details}"[:MAX_REASON_CHARS]
        if reason in self._reasons or len(self._reasons) < MAX_REASONS:
            self._reasons[reason] += 1
        self._reconnects[d] = asyncio.create_task(
            self._fail_over(d, stream.node, time.monotonic_ns()), name=f"failover-{d}"
        )

    # Pipe ---------------------------------------------------------------------------
    def _on_pipe(self) -> None:
        while self.conn.poll():
            message = self.conn.recv()
            if isinstance(message, msg.Stop):
                self.stop.set()
            else:
                self._inbox.put_nowait(message)

    async def _receive(self, kind: type[M]) -> M:
        message = await self._inbox.get()
        if not isinstance(message, kind):
            raise RuntimeError(f"expected {kind.__name__} from the coordinator, got {message!r}")
        return message

    # Phases -------------------------------------------------------------------------
    async def run(self) -> None:
        """Every phase in order; the coordinator drives the transitions."""
        cfg = self.cfg
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._on_pipe)
        # The event loop made the pipe non-blocking; sends of large results must block.
        os.set_blocking(self.conn.fileno(), True)
        mine = [d for d in range(cfg.devices) if cfg.owner_of(d) == self.index]
        for node, target in enumerate(cfg.targets):
            self.channels[node] = [
                secure_or_plain_channel(
                    target, ca_file=cfg.tls_ca, options=[*CHANNEL_OPTIONS, ("loadtest.ch", i)]
                )
                for i in range(cfg.connections_per_node())
            ]
        t0 = time.perf_counter()
        await self._register(mine)
        t1 = time.perf_counter()
        await self._connect([d for d in mine if not cfg.is_offline(d)], late=False)
        t2 = time.perf_counter()
        addresses = {d: (i.user, i.device) for d, i in self.identities.items()}
        self.conn.send(msg.Ready(self.index, addresses, t1 - t0, t2 - t1, len(self.streams)))
        go = await asyncio.wait_for(self._receive(msg.Go), cfg.setup_timeout_s)
        # What exists now (channels, streams, keys) lives until the end: keep the cyclic
        # collector from scanning it again and again, and let only the young generation
        # be collected during the load (full collections over thousands of streams pause
        # for 100+ ms, and the generator's pauses would count as latency).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*LOAD_GC_THRESHOLDS)
        self.gc_pauses.longest_ms = 0.0  # only pauses during the load count
        cpu_at_go, wall_at_go = time.process_time(), time.monotonic()
        self._start_ns = go.start_ns
        self.sender = self._sender(go)
        ticker = asyncio.create_task(self._tick())
        try:
            await self.sender.run(self.stop)
            answered = await _within(self.sender.answered(), cfg.drain_timeout_s)
            self.conn.send(
                msg.SendDone(
                    self.index,
                    self.sender.acknowledged_to,
                    unanswered_to=self.sender.unanswered_to(),
                    load_cpu_s=time.process_time() - cpu_at_go,
                    load_wall_s=time.monotonic() - wall_at_go,
                )
            )
            drain = await asyncio.wait_for(self._receive(msg.Drain), cfg.drain_timeout_s + 60)
            self.receiver.expect(drain.expected, drain.unanswered)
            await self._settle_failovers(cfg.drain_timeout_s)
            late = [d for d in mine if d not in self.streams or not self.streams[d].open]
            await self._connect(late, late=True)
            complete = await _within(self.receiver.reached(), cfg.drain_timeout_s)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        self._flush()
        await self._close()
        notes = [] if answered else ["some batches were never answered before the timeout"]
        if self._failed:
            notes.append(f"{self._failed} device(s) found no target to reconnect to")
        self.conn.send(self._result(complete, notes))

    def _sender(self, go: msg.Go) -> Sender:
        cfg = self.cfg
        recipients = [encode_address(cfg.tenant, u, n) for u, n in go.addresses]
        padding = os.urandom(max(0, cfg.payload_bytes))
        by_node: dict[int, list[int]] = defaultdict(list)
        for d in range(cfg.devices):
            if cfg.offline_recipients and not cfg.is_offline(d):
                continue
            by_node[0 if cfg.cross_node else cfg.node_of(d)].append(d)
        senders: dict[int, list[DeviceStream]] = defaultdict(list)
        for stream in self.streams.values():
            senders[stream.node].append(stream)
        if cfg.cross_node:
            by_node = {n: by_node[0] for n in range(len(cfg.targets))}
        return Sender(
            worker=self.index,
            workers=cfg.workers,
            batch=cfg.batch,
            fanout=cfg.fanout,
            max_backlog=cfg.max_backlog,
            run_tag=self.run_tag,
            schedule=cfg.parsed_schedule(),
            start_ns=go.start_ns,
            encoder=BatchEncoder(recipients, cfg.payload_bytes, padding),
            senders=dict(senders),
            recipients=dict(by_node),
            counters=lambda: self.counters,
        )

    async def _register(self, devices: list[int]) -> None:
        cfg = self.cfg
        user_prefix = self.run_tag.hex()
        for node in range(len(cfg.targets)):
            users = [(d, f"lt-{user_prefix}-{d}") for d in devices if cfg.node_of(d) == node]
            if not users:
                continue
            options = [*CHANNEL_OPTIONS, ("loadtest.keys", node)]
            target = cfg.key_target(node)
            async with secure_or_plain_channel(target, ca_file=cfg.tls_ca, options=options) as ch:
                for ident in await register_all(ch, cfg.tenant, users, cfg.register_concurrency):
                    self.identities[ident.index] = ident

    async def _connect(self, devices: list[int], *, late: bool) -> None:
        """Open the streams of ``devices``, each on its home target first.

        At setup (``late`` False) a device no target takes fails the worker (the run
        cannot start as configured); at the drain it is counted and the run goes on.
        """
        cfg = self.cfg
        within = cfg.drain_timeout_s if late else cfg.setup_timeout_s

        async def one(d: int) -> None:
            try:
                stream = await self._dial(
                    d, cfg.node_of(d), late=late, within_s=within, timeout_s=HANDSHAKE_TIMEOUT_S
                )
            except NoTarget:
                if not late:
                    raise
                self._failed += 1
                return
            self.streams[d] = stream
            stream.start()

        await asyncio.gather(*(one(d) for d in devices))

    async def _dial(
        self,
        d: int,
        first: int,
        *,
        late: bool,
        within_s: float,
        timeout_s: float,
        backoff_first: bool = False,
    ) -> DeviceStream:
        """A handshaken (not started) stream of device ``d``: target ``first``, then the
        next ones in order, with the SDK's backoff between attempts, for ``within_s``.

        Raises NoTarget, naming the last failure, when no attempt succeeded in time.
        """
        cfg = self.cfg
        deadline = time.monotonic() + within_s
        backoff = ExponentialBackoff(cap=FAILOVER_BACKOFF_CAP_S)
        failures = 1 if backoff_first else 0
        node, last = first, ""
        while True:
            if failures:
                await backoff(failures)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoTarget(
                    f"device #{d}: no target took it within {within_s:g} s (last: {last})"
                )
            channels = self.channels[node]
            call = open_call(channels[(d // cfg.workers) % len(channels)])
            try:
                async with self._gate:
                    await asyncio.wait_for(
                        handshake(call, self.identities[d], receive=True), min(timeout_s, left)
                    )
            except (grpc.aio.AioRpcError, HandshakeError, TimeoutError) as exc:
                call.cancel()
                if isinstance(exc, grpc.aio.AioRpcError):
                    status: grpc.StatusCode | None = exc.code()
                    last = f"{cfg.targets[node]}: {exc.code().name} {exc.details()}"
                else:
                    status = exc.status if isinstance(exc, HandshakeError) else None
                    last = f"{cfg.targets[node]}: {exc!r}"
                if not isinstance(exc, TimeoutError) and status not in RETRYABLE:
                    raise NoTarget(f"device #{d}: not retried: {last}") from exc
                self._failed_attempts += 1
                failures += 1
                node = (node + 1) % len(cfg.targets)
                continue
            return DeviceStream(self.identities[d], node, call, self, late=late)

    async def _fail_over(self, d: int, node: int, lost_ns: int) -> None:
        """Reconnect device ``d`` (its stream on ``node`` ended at ``lost_ns``)."""
        n = len(self.cfg.targets)
        try:
            stream = await self._dial(
                d,
                (node + 1) % n,
                late=True,
                within_s=self.cfg.drain_timeout_s,
                timeout_s=FAILOVER_HANDSHAKE_TIMEOUT_S,
                backoff_first=True,
            )
        except NoTarget:
            self._failed += 1
            return
        finally:
            self._reconnects.pop(d, None)
        ready_ns = time.monotonic_ns()
        stream.away = (lost_ns, ready_ns)
        self.streams[d] = stream
        stream.start()
        self._reconnect.record_us((ready_ns - lost_ns) // 1000)
        self._moves[f"{node}->{stream.node}"] += 1
        if self.sender is not None:
            self.sender.add_stream(stream)

    async def _settle_failovers(self, seconds: float) -> None:
        """Wait up to ``seconds`` for reconnects in progress; stop the rest (counted)."""
        tasks = list(self._reconnects.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._failed += len(pending)

    async def _tick(self) -> None:
        interval_ns = int(self.cfg.interval_s * 1e9)
        while True:
            boundary = self._start_ns + (self._interval + 1) * interval_ns
            delay = boundary - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)  # a reporting period, not synchronisation
            self._flush()

    def _flush(self) -> None:
        done, self.counters = self.counters, IntervalCounters()
        self.conn.send(done.message(self.index, self._interval))
        self._interval += 1

    async def _close(self) -> None:
        self._closing = True
        for task in list(self._reconnects.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(s.close() for s in self.streams.values()))
        for channels in self.channels.values():
            for channel in channels:
                await channel.close()

    def _result(self, complete: bool, notes: list[str]) -> msg.Result:
        assert self.sender is not None
        sender, receiver = self.sender, self.receiver
        return msg.Result(
            worker=self.index,
            status=bytes(sender.record.status),
            recipients=sender.record.recipients.tobytes(),
            received={w: bytes(c) for w, c in receiver.receipts.counts.items()},
            unexpected=receiver.receipts.unexpected,
            drained=receiver.drained.encode(),
            answer=sender.answer.encode(),
            send_lag=sender.lag.encode(),
            gc_max_pause_ms=round(self.gc_pauses.longest_ms, 3),
            errors=dict(receiver.errors),
            totals={"streams": len(self.streams), "inflight_at_end": sender.inflight},
            cpu_s=time.process_time(),
            drain_complete=complete,
            notes=notes,
            failover=msg.Failover(
                lost=self._lost,
                reconnected=self._reconnect.count,
                failed=self._failed,
                failed_attempts=self._failed_attempts,
                reconnect=self._reconnect.encode(),
                stored_meanwhile=receiver.stored_meanwhile,
                moves=dict(self._moves),
                reasons=dict(self._reasons),
            ),
        )


class GcPauses:
    """Measures this process's garbage-collection pauses (they delay receipts)."""

    def __init__(self) -> None:
        self.longest_ms = 0.0
        self._started = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` hook."""
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._started) * 1000)


async def _within(waiting: Coroutine[Any, Any, None], seconds: float) -> bool:
    """Whether ``waiting`` finished within ``seconds`` (it is cancelled if not)."""
    try:
        await asyncio.wait_for(waiting, seconds)
    except TimeoutError:
        return False
    return True


def _pin(cpus: tuple[int, ...]) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def worker_main(cfg: LoadConfig, index: int, run_tag: bytes, conn: Connection) -> None:
    """Process entry point (multiprocessing spawn target)."""
    _pin(cfg.cpus)
    try:
        import uvloop  # noqa: PLC0415 - only in the worker process

        uvloop.run(Worker(cfg, index, run_tag, conn).run())
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(msg.Failed(index, traceback.format_exc()))
        raise
    finally:
        conn.close()
