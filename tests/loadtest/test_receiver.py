"""The receiving side: when the drain may end, and what counts as stored meanwhile."""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtest.intervals import IntervalCounters
from loadtest.receiver import Receiver
from loadtest.wire import HEADER, MAGIC, message_id
from relaypb.relay.v1 import relay_pb2

TAG = b"run1"


@dataclass
class FakeIdentity:
    index: int


@dataclass
class FakeStream:
    """What the receiver reads of a DeviceStream, and the acks it queues."""

    identity: FakeIdentity
    late: bool = False
    away: tuple[int, int] | None = None
    acked: list[bytes] = field(default_factory=list)

    def ack(self, ids: list[bytes]) -> None:
        self.acked.extend(ids)


def envelope(worker: int, seq: int, intended_ns: int, recipient: int) -> relay_pb2.Envelope:
    return relay_pb2.Envelope(
        message_id=message_id(TAG, worker, seq),
        content=HEADER.pack(MAGIC, worker, seq, intended_ns, recipient),
    )


def receiver() -> Receiver:
    counters = IntervalCounters()
    return Receiver(TAG, lambda: counters)


def test_unanswered_deliveries_do_not_end_the_drain_early() -> None:
    # Seq 1 was never answered (its sender's stream died): it arrived, but the drain
    # must still wait for the two acknowledged ones (seqs 0 and 2).
    r = receiver()
    stream = FakeStream(FakeIdentity(5))
    r.on_deliver(stream, [envelope(0, 0, 10, 5), envelope(0, 1, 10, 5)])  # type: ignore[arg-type]
    r.expect(2, {0: [1]})
    assert not r._reached.is_set()
    r.on_deliver(stream, [envelope(0, 1, 10, 5)])  # type: ignore[arg-type]  # a copy again
    assert not r._reached.is_set()
    r.on_deliver(stream, [envelope(0, 2, 10, 5)])  # type: ignore[arg-type]
    assert r._reached.is_set()
    assert len(stream.acked) == 4  # every copy is acked, counted or not


def test_without_unanswered_envelopes_unique_deliveries_end_the_drain() -> None:
    r = receiver()
    r.expect(2)
    stream = FakeStream(FakeIdentity(1))
    r.on_deliver(stream, [envelope(0, 0, 10, 1)])  # type: ignore[arg-type]
    assert not r._reached.is_set()
    r.on_deliver(stream, [envelope(1, 0, 10, 1)])  # type: ignore[arg-type]
    assert r._reached.is_set()


def test_stored_meanwhile_counts_first_copies_sent_while_the_device_was_away() -> None:
    r = receiver()
    stream = FakeStream(FakeIdentity(3), late=True, away=(1_000, 2_000))
    envs = [
        envelope(0, 0, 900, 3),  # before the loss: redelivered, not "meanwhile"
        envelope(0, 1, 1_500, 3),
        envelope(0, 2, 2_000, 3),
        envelope(0, 1, 1_500, 3),  # a second copy counts once
        envelope(0, 3, 2_500, 3),  # after the new Ready: live again
    ]
    r.on_deliver(stream, envs)  # type: ignore[arg-type]
    assert r.stored_meanwhile == 2
    assert r.drained.count == 5  # a reconnected (late) stream's deliveries: store and forward
