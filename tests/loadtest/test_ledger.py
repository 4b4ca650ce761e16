"""The loss accounting: fabricated send records and receipts, every verdict."""

from __future__ import annotations

from loadtest import ledger
from loadtest.ledger import MissingEnvelope, Receipts, SendRecord, reconcile


def record(statuses: list[int]) -> SendRecord:
    r = SendRecord()
    first = r.add_batch(list(range(len(statuses))))
    r.set(first, statuses)
    return r


def counts(*pairs: tuple[int, int]) -> Receipts:
    rec = Receipts()
    for seq, times in pairs:
        for _ in range(times):
            rec.add(0, seq)
    return rec


def test_everything_delivered_once_is_ok() -> None:
    sent = {0: record([ledger.STORED] * 4)}
    rec = counts((0, 1), (1, 1), (2, 1), (3, 1))
    v = reconcile(sent, [rec.counts])
    assert v.ok
    assert (v.acknowledged, v.delivered_once, v.missing, v.duplicated) == (4, 4, 0, 0)
    assert v.verdict().startswith("OK")


def test_a_missing_message_fails_loudly_with_details() -> None:
    sent = {0: record([ledger.STORED] * 4)}
    rec = counts((0, 1), (1, 1), (3, 1))

    def describe(worker: int, seq: int, recipient: int) -> MissingEnvelope:
        return MissingEnvelope(worker, seq, f"device {recipient}", 12.5, "ab" * 16)

    v = reconcile(sent, [rec.counts], describe=describe)
    assert not v.ok
    assert v.missing == 1
    assert v.verdict().startswith("LOSS: 1 of 4 acknowledged envelopes were never delivered")
    assert v.missing_examples == (MissingEnvelope(0, 2, "device 2", 12.5, "ab" * 16),)
    assert v.as_dict()["ok"] is False
    assert v.as_dict()["missing_examples"][0]["seq"] == 2


def test_duplicates_are_counted_not_fatal() -> None:
    sent = {0: record([ledger.STORED, ledger.STORED])}
    v = reconcile(sent, [counts((0, 3), (1, 1)).counts])
    assert v.ok
    assert (v.duplicated, v.duplicate_copies, v.delivered_once) == (1, 2, 1)


def test_receipts_from_several_workers_add_up() -> None:
    sent = {0: record([ledger.STORED] * 3)}
    a, b = counts((0, 1), (1, 1)), counts((1, 1), (2, 1))
    v = reconcile(sent, [a.counts, b.counts])
    assert (v.missing, v.duplicated, v.delivered_once) == (0, 1, 2)


def test_unanswered_may_or_may_not_arrive() -> None:
    sent = {0: record([ledger.PENDING, ledger.FAILED, ledger.STORED])}
    v = reconcile(sent, [counts((0, 1), (2, 1)).counts])
    assert v.ok
    assert (v.unacknowledged, v.unacknowledged_delivered) == (2, 1)


def test_rejected_but_delivered_and_unknown_ids_fail() -> None:
    sent = {0: record([ledger.REJECTED, ledger.STORED])}
    rec = counts((0, 1), (1, 1), (7, 1))  # seq 7 was never sent
    rec.add(5, 0)  # a worker that sent nothing
    v = reconcile(sent, [rec.counts], unexpected=2)
    assert not v.ok
    assert v.rejected_delivered == 1
    assert v.unexpected == 2 + 1 + 1


def test_unsent_envelopes_are_not_sent() -> None:
    sent = {0: record([ledger.UNSENT, ledger.UNSENT, ledger.STORED])}
    v = reconcile(sent, [counts((2, 1)).counts])
    assert v.ok
    assert (v.sent, v.unsent) == (1, 2)


def test_receipts_saturate_and_grow() -> None:
    rec = Receipts()
    for _ in range(300):
        rec.add(1, 5000)
    assert rec.counts[1][5000] == ledger.MAX_COUNT
    assert rec.unique == 1


def test_a_delivered_answer_is_an_acknowledgement_that_must_arrive() -> None:
    # DELIVERED: the relay pushed it and the recipient acked before anything was stored.
    sent = {0: record([ledger.DELIVERED, ledger.DELIVERED, ledger.STORED, ledger.REJECTED])}
    v = reconcile(sent, [counts((0, 1), (2, 1)).counts])
    assert not v.ok
    assert (v.acknowledged, v.answered_delivered, v.missing) == (3, 2, 1)
    assert v.missing_examples[0].seq == 1
    assert v.direct_share == 0.5  # 2 DELIVERED of 4 answered (REJECTED counts as answered)
    assert v.as_dict()["direct_share"] == 0.5
    ok = reconcile(sent, [counts((0, 1), (1, 1), (2, 1)).counts])
    assert ok.ok
    assert ok.delivered_once == 3


def test_direct_share_is_none_when_nothing_was_answered() -> None:
    v = reconcile({0: record([ledger.PENDING])}, [{}])
    assert v.direct_share is None
    assert v.as_dict()["direct_share"] is None


class FakeStream:
    """What the sender needs of a DeviceStream: where it is and what it was handed."""

    def __init__(self) -> None:
        self.open = True
        self.node = 0
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_the_sender_records_a_delivered_outcome_as_delivered() -> None:
    import asyncio

    from loadtest.intervals import IntervalCounters
    from loadtest.schedule import parse_schedule
    from loadtest.traffic import Sender
    from loadtest.wire import BatchEncoder, encode_address
    from relaypb.relay.v1 import relay_pb2

    async def scenario() -> tuple[Sender, IntervalCounters]:
        counters = IntervalCounters()
        stream = FakeStream()
        sender = Sender(
            worker=0,
            workers=1,
            batch=3,
            fanout=1,
            max_backlog=100,
            run_tag=b"tag0",
            schedule=parse_schedule("constant:10", 1.0),
            start_ns=0,
            encoder=BatchEncoder([encode_address("t", "u", 1)], 24, b""),
            senders={0: [stream]},  # type: ignore[list-item]
            recipients={0: [0]},
            counters=lambda: counters,
        )
        sender._send(0, 0)
        assert len(stream.frames) == 1
        outcomes = [
            relay_pb2.OUTCOME_DELIVERED,
            relay_pb2.OUTCOME_STORED,
            relay_pb2.OUTCOME_DUPLICATE,
        ]
        sender.on_results(
            relay_pb2.SendResults(
                batch_id=0, results=[relay_pb2.SendResult(outcome=o) for o in outcomes]
            )
        )
        return sender, counters

    sender, counters = asyncio.run(scenario())
    assert list(sender.record.status) == [ledger.DELIVERED, ledger.STORED, ledger.DUPLICATE]
    assert counters.acked == 3
    assert sender.acknowledged_to == [3]
    assert sender.inflight == 0
