"""Loss accounting: what each worker sent, what each worker received, and the verdict.

Every envelope has a (sender worker, sequence) key. The sending worker keeps one status
byte per sequence (:class:`SendRecord`); every receiving worker keeps one saturating
count per key it saw (:class:`Receipts`). :func:`reconcile` joins them: each envelope the
relay acknowledged (DELIVERED, STORED or DUPLICATE) must have been delivered exactly once.
A DELIVERED answer (the recipient acked the envelope before it was stored) is an
acknowledgement like the others: that envelope must arrive too. One
acknowledged envelope never delivered is *missing*, and a run with any missing envelope
fails. Envelopes without an answer (the stream failed) may or may not arrive
(at-least-once): they are counted apart, never as a failure. An envelope delivered after
a REJECTED answer, or one nobody sent, is a contract violation and fails the run too.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

# Status of one sequence at its sender.
UNUSED = 0  # never assigned (beyond the end, or a gap)
PENDING = 1  # written to a stream, no SendResult yet
STORED = 2
DUPLICATE = 3
REJECTED = 4
FAILED = 5  # the stream ended before its SendResult came
UNSENT = 6  # dropped by the generator itself (backlog over --max-backlog)
DELIVERED = 7  # answered DELIVERED: the recipient acked it before it was stored
ACKNOWLEDGED = (STORED, DUPLICATE, DELIVERED)
MAX_COUNT = 255


@dataclass
class SendRecord:
    """One worker's outbound record: a status byte and a recipient index per sequence."""

    status: bytearray = field(default_factory=bytearray)
    recipients: array[int] = field(default_factory=lambda: array("I"))

    def add_batch(self, recipients: Sequence[int], status: int = PENDING) -> int:
        """Record a batch whose sequences follow the last one; return its first sequence."""
        first = len(self.status)
        self.status.extend(bytes([status]) * len(recipients))
        self.recipients.extend(recipients)
        return first

    def set(self, first: int, statuses: Sequence[int]) -> None:
        """Set the statuses of sequences ``first``, ``first + 1``, ..."""
        self.status[first : first + len(statuses)] = bytes(statuses)

    def fail_pending(self, first: int, count: int) -> None:
        """Mark still-pending sequences of a batch as FAILED (their stream ended)."""
        for seq in range(first, first + count):
            if self.status[seq] == PENDING:
                self.status[seq] = FAILED


class Receipts:
    """What one worker received: a saturating delivery count per (sender worker, sequence)."""

    def __init__(self) -> None:
        self.counts: dict[int, bytearray] = {}
        self.unique = 0
        self.unexpected = 0

    def add(self, worker: int, seq: int) -> int:
        """Count one delivery; return how many times this key has now been seen."""
        counts = self.counts.get(worker)
        if counts is None:
            counts = self.counts[worker] = bytearray(max(1024, seq + 1))
        elif seq >= len(counts):
            counts.extend(bytes(max(seq + 1, 2 * len(counts)) - len(counts)))
        seen = counts[seq]
        if seen < MAX_COUNT:
            counts[seq] = seen + 1
        if seen == 0:
            self.unique += 1
        return seen + 1


@dataclass(frozen=True, slots=True)
class MissingEnvelope:
    """An acknowledged envelope that never arrived (for the loud part of the report)."""

    worker: int
    seq: int
    recipient: str
    intended_offset_ms: float | None
    message_id: str


Describe = Callable[[int, int, int], MissingEnvelope]
_TOTALS = (
    "sent",
    "acknowledged",
    "answered_delivered",
    "rejected",
    "unacknowledged",
    "unsent",
    "once",
    "duplicated",
    "copies",
    "missing",
    "unacked_delivered",
    "rejected_delivered",
)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """The verdict on every envelope of a run."""

    sent: int
    acknowledged: int
    rejected: int
    #: Acknowledged envelopes answered DELIVERED (pushed and acked before being stored).
    answered_delivered: int
    unacknowledged: int
    unsent: int
    delivered_once: int
    duplicated: int
    duplicate_copies: int
    missing: int
    unacknowledged_delivered: int
    rejected_delivered: int
    unexpected: int
    missing_examples: tuple[MissingEnvelope, ...] = ()

    @property
    def direct_share(self) -> float | None:
        """Envelopes answered DELIVERED / every answered one (None: nothing answered)."""
        answered = self.acknowledged + self.rejected
        return self.answered_delivered / answered if answered else None

    @property
    def ok(self) -> bool:
        """No acknowledged envelope lost, none delivered against its answer, none invented."""
        return self.missing == 0 and self.rejected_delivered == 0 and self.unexpected == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "missing_examples"
        }
        out["ok"] = self.ok
        share = self.direct_share
        out["direct_share"] = None if share is None else round(share, 4)
        out["missing_examples"] = [vars_of(m) for m in self.missing_examples]
        return out

    def verdict(self) -> str:
        """One line a person reads first; starts with LOSS when the run failed."""
        if self.ok:
            return (
                f"OK: all {self.acknowledged} acknowledged envelopes delivered "
                f"({self.duplicated} duplicated, {self.unacknowledged} unanswered)"
            )
        return (
            f"LOSS: {self.missing} of {self.acknowledged} acknowledged envelopes were never "
            f"delivered; {self.rejected_delivered} delivered although rejected; "
            f"{self.unexpected} delivered that nobody sent"
        )


def vars_of(m: MissingEnvelope) -> dict[str, Any]:
    """A MissingEnvelope as a dict."""
    return {
        "worker": m.worker,
        "seq": m.seq,
        "recipient": m.recipient,
        "intended_offset_ms": m.intended_offset_ms,
        "message_id": m.message_id,
    }


def merge_counts(
    parts: Sequence[bytes | bytearray], length: int
) -> tuple[np.ndarray[Any, np.dtype[np.uint16]], int]:
    """Sum saturating count arrays over ``length`` sequences.

    Returns the sums and how many sequences at or past ``length`` were delivered (the
    sender never assigned them: unexpected).
    """
    total = np.zeros(length, dtype=np.uint16)
    beyond = 0
    for part in parts:
        arr = np.frombuffer(bytes(part), dtype=np.uint8)
        n = min(len(arr), length)
        total[:n] += arr[:n]
        beyond += int(np.count_nonzero(arr[n:]))
    return total, beyond


def reconcile(
    sent: Mapping[int, SendRecord],
    received: Sequence[Mapping[int, bytes | bytearray]],
    *,
    unexpected: int = 0,
    describe: Describe | None = None,
    max_examples: int = 20,
) -> Reconciliation:
    """Join the senders' records with every receiver's counts into a verdict.

    ``received`` holds one mapping per receiving worker (sender worker -> counts).
    ``unexpected`` adds deliveries the receivers could not even attribute (bad header).
    ``describe(worker, seq, recipient_index)`` details a missing envelope for the report.
    """
    totals = dict.fromkeys(_TOTALS, 0)
    examples: list[MissingEnvelope] = []
    workers = set(sent) | {w for r in received for w in r}
    for w in sorted(workers):
        record = sent.get(w, SendRecord())
        status = np.frombuffer(bytes(record.status), dtype=np.uint8)
        counts, beyond = merge_counts([r[w] for r in received if w in r], len(status))
        unexpected += beyond
        acked = np.isin(status, ACKNOWLEDGED)
        unanswered = (status == PENDING) | (status == FAILED)
        delivered = counts > 0
        totals["sent"] += int(np.count_nonzero((status != UNUSED) & (status != UNSENT)))
        totals["acknowledged"] += int(np.count_nonzero(acked))
        totals["answered_delivered"] += int(np.count_nonzero(status == DELIVERED))
        totals["rejected"] += int(np.count_nonzero(status == REJECTED))
        totals["unacknowledged"] += int(np.count_nonzero(unanswered))
        totals["unsent"] += int(np.count_nonzero(status == UNSENT))
        totals["once"] += int(np.count_nonzero(acked & (counts == 1)))
        dup = acked & (counts > 1)
        totals["duplicated"] += int(np.count_nonzero(dup))
        totals["copies"] += int(counts[dup].sum() - np.count_nonzero(dup))
        missing = np.flatnonzero(acked & ~delivered)
        totals["missing"] += len(missing)
        totals["unacked_delivered"] += int(np.count_nonzero(unanswered & delivered))
        totals["rejected_delivered"] += int(np.count_nonzero((status == REJECTED) & delivered))
        unexpected += int(np.count_nonzero(((status == UNUSED) | (status == UNSENT)) & delivered))
        for seq in missing[: max(0, max_examples - len(examples))]:
            s = int(seq)
            if describe is not None:
                examples.append(describe(w, s, record.recipients[s]))
            else:
                examples.append(MissingEnvelope(w, s, str(record.recipients[s]), None, ""))
    return Reconciliation(
        sent=totals["sent"],
        acknowledged=totals["acknowledged"],
        rejected=totals["rejected"],
        answered_delivered=totals["answered_delivered"],
        unacknowledged=totals["unacknowledged"],
        unsent=totals["unsent"],
        delivered_once=totals["once"],
        duplicated=totals["duplicated"],
        duplicate_copies=totals["copies"],
        missing=totals["missing"],
        unacknowledged_delivered=totals["unacked_delivered"],
        rejected_delivered=totals["rejected_delivered"],
        unexpected=unexpected,
        missing_examples=tuple(examples),
    )
