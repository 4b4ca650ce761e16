"""The sender side of a worker: the open-loop schedule, SendBatch frames, their answers.

Batch ``j`` of worker ``w`` (of ``W``) carries the envelopes numbered ``(j*W + w)*B`` ..
``+B-1`` of the run, all with the intended time of the first; its sequences are
``j*B .. j*B+B-1``, so a sequence alone gives back its intended time. The loop never
waits for answers: a batch that is due is handed to a stream whatever is still in
flight, up to ``max_backlog`` unanswered envelopes (past that the generator itself is
saturated, and the batch is recorded as UNSENT with the error GENERATOR_BACKLOG).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from loadtest import ledger
from loadtest.intervals import IntervalCounters
from loadtest.latency import Histogram
from loadtest.schedule import Schedule
from loadtest.streams import DeviceStream
from loadtest.wire import BatchEncoder
from relaypb.relay.v1 import relay_pb2

#: Longest single sleep of the loop, so that a Stop is seen promptly.
MAX_SLEEP_S = 0.05
#: Batches sent back to back before yielding to the readers (when catching up).
YIELD_EVERY = 16

_CODE_NAMES = {int(c.value[0]): c.name for c in grpc.StatusCode}
_STATUS_OF = {
    relay_pb2.OUTCOME_STORED: ledger.STORED,
    relay_pb2.OUTCOME_DELIVERED: ledger.DELIVERED,
    relay_pb2.OUTCOME_DUPLICATE: ledger.DUPLICATE,
}


@dataclass(frozen=True, slots=True)
class Pending:
    """A batch written to a stream and not answered yet."""

    stream: DeviceStream
    first: int
    count: int
    sent_ns: int


class Sender:
    """Runs the schedule for one worker and records every envelope's fate."""

    def __init__(
        self,
        *,
        worker: int,
        workers: int,
        batch: int,
        fanout: int,
        max_backlog: int,
        run_tag: bytes,
        schedule: Schedule,
        start_ns: int,
        encoder: BatchEncoder,
        senders: dict[int, list[DeviceStream]],
        recipients: dict[int, list[int]],
        counters: Callable[[], IntervalCounters],
    ) -> None:
        self.worker, self.workers, self.batch, self.fanout = worker, workers, batch, fanout
        self.max_backlog = max_backlog
        self.run_tag = run_tag
        self.schedule = schedule
        self.start_ns = start_ns
        self.encoder = encoder
        self.senders = {n: s for n, s in senders.items() if s}
        self.recipients = recipients
        self.counters = counters
        self.record = ledger.SendRecord()
        self.answer = Histogram()
        self.lag = Histogram()
        self.acknowledged_to = [0] * workers
        self.inflight = 0
        self._pending: dict[int, Pending] = {}
        self._nodes = sorted(self.senders)
        self._sender_turn = dict.fromkeys(self._nodes, 0)
        span = {n: max(1, len(r) // workers) for n, r in recipients.items()}
        self._cursor = {n: worker * span[n] for n in recipients}
        self._answered = asyncio.Event()

    def intended_offset_s(self, seq: int) -> float | None:
        """Intended time (s from start) of this worker's envelope ``seq``."""
        j = seq // self.batch
        return self.schedule.time_of((j * self.workers + self.worker) * self.batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Send every batch at its intended time until the schedule ends or ``stop``."""
        j = 0
        burst = 0
        end_ns = self.start_ns + int(self.schedule.duration * 1e9)
        while not stop.is_set():
            offset = self.schedule.time_of((j * self.workers + self.worker) * self.batch)
            due = end_ns if offset is None else self.start_ns + int(offset * 1e9)
            wait = due - time.monotonic_ns()
            if wait > 0:
                burst = 0
                await asyncio.sleep(min(wait / 1e9, MAX_SLEEP_S))
                continue
            if offset is None:
                break  # the schedule is over, and so is its time
            self._send(j, due)
            j += 1
            burst += 1
            if burst >= YIELD_EVERY:
                burst = 0
                await asyncio.sleep(0)

    def _next_stream(self, j: int) -> DeviceStream | None:
        for k in range(len(self._nodes)):
            node = self._nodes[(j + k) % len(self._nodes)]
            streams = self.senders[node]
            for _ in range(len(streams)):
                turn = self._sender_turn[node]
                self._sender_turn[node] = (turn + 1) % len(streams)
                if streams[turn].open:
                    return streams[turn]
        return None

    def _next_recipients(self, node: int) -> list[int]:
        pool = self.recipients[node]
        start = self._cursor[node]
        self._cursor[node] = (start + self.fanout) % len(pool)
        chosen = [pool[(start + i) % len(pool)] for i in range(self.fanout)]
        return [chosen[e % self.fanout] for e in range(self.batch)]

    def _send(self, j: int, due_ns: int) -> None:
        counters = self.counters()
        stream = self._next_stream(j)
        node = stream.node if stream is not None else self._nodes[j % len(self._nodes)]
        recipients = self._next_recipients(node)
        if stream is None or self.inflight + self.batch > self.max_backlog:
            self.record.add_batch(recipients, ledger.UNSENT)
            reason = "NO_OPEN_STREAM" if stream is None else "GENERATOR_BACKLOG"
            counters.errors[reason] += self.batch
            return
        first = self.record.add_batch(recipients)
        self.lag.record_us((time.monotonic_ns() - due_ns) // 1000)
        frame = self.encoder.send_frame(
            j,
            run_tag=self.run_tag,
            worker=self.worker,
            first_seq=first,
            intended_ns=due_ns,
            recipients=recipients,
        )
        stream.send(frame)
        self._pending[j] = Pending(stream, first, self.batch, time.monotonic_ns())
        self.inflight += self.batch
        self._answered.clear()
        counters.sent += self.batch

    def on_results(self, results: relay_pb2.SendResults) -> None:
        """Record the answer to one batch."""
        counters = self.counters()
        pending = self._pending.pop(results.batch_id, None)
        if pending is None:
            counters.errors["UNKNOWN_BATCH_ID"] += 1
            return
        self.answer.record_us((time.monotonic_ns() - pending.sent_ns) // 1000)
        statuses = self._statuses(results.results, pending.count, counters)
        self.record.set(pending.first, statuses)
        recipients, workers = self.record.recipients, self.workers
        acked = 0
        for i, status in enumerate(statuses):
            if status in ledger.ACKNOWLEDGED:
                acked += 1
                self.acknowledged_to[recipients[pending.first + i] % workers] += 1
        counters.acked += acked
        self._settle(pending.count)

    def _statuses(
        self, results: Sequence[relay_pb2.SendResult], count: int, counters: IntervalCounters
    ) -> list[int]:
        out = []
        for r in results[:count]:
            status = _STATUS_OF.get(r.outcome)
            if status is None:
                status = ledger.REJECTED
                name = _CODE_NAMES.get(r.code, str(r.code)) if r.code else "REJECTED"
                counters.errors[name + (f"({r.limit})" if r.limit else "")] += 1
            out.append(status)
        if len(out) < count:
            counters.errors["MISSING_SEND_RESULT"] += count - len(out)
            out += [ledger.FAILED] * (count - len(out))
        return out

    def unanswered_to(self) -> dict[int, list[int]]:
        """Sequences still PENDING or FAILED, by the worker that holds their recipient."""
        status = np.frombuffer(bytes(self.record.status), dtype=np.uint8)
        seqs = np.flatnonzero((status == ledger.PENDING) | (status == ledger.FAILED))
        out: dict[int, list[int]] = {}
        recipients, workers = self.record.recipients, self.workers
        for seq in seqs.tolist():
            out.setdefault(recipients[seq] % workers, []).append(seq)
        return out

    def add_stream(self, stream: DeviceStream) -> None:
        """Send from ``stream`` too: a device's new session after it failed over.

        Streams that ended stay in the rotation (it skips them), so turns stay valid.
        """
        if stream.node not in self.recipients:
            return
        self.senders.setdefault(stream.node, []).append(stream)
        if stream.node not in self._sender_turn:
            self._sender_turn[stream.node] = 0
            self._nodes = sorted(self.senders)

    def on_stream_closed(self, stream: DeviceStream) -> None:
        """Fail the unanswered batches of a stream that ended."""
        lost = [j for j, p in self._pending.items() if p.stream is stream]
        for j in lost:
            p = self._pending.pop(j)
            self.record.fail_pending(p.first, p.count)
            self._settle(p.count)

    def _settle(self, count: int) -> None:
        self.inflight -= count
        if self.inflight == 0:
            self._answered.set()

    async def answered(self) -> None:
        """Return once every batch sent so far is answered (or failed with its stream)."""
        if self.inflight:
            await self._answered.wait()
