"""Hand-encoded frames parse back to the same fields with the generated protobuf code."""

from __future__ import annotations

from loadtest.wire import (
    BatchEncoder,
    ack_frame,
    encode_address,
    message_id,
    parse_header,
    varint,
)
from relaypb.relay.v1 import relay_pb2


def test_varint() -> None:
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(300) == b"\xac\x02"


def test_send_frame_round_trips() -> None:
    recipients = [encode_address("t", f"user-{i}", i + 1) for i in range(3)]
    enc = BatchEncoder(recipients, payload_bytes=300, padding=bytes(range(256)) * 2)
    frame = relay_pb2.ClientFrame.FromString(
        enc.send_frame(
            batch_id=2**40 + 5,
            run_tag=b"RUN1",
            worker=3,
            first_seq=1000,
            intended_ns=123456789,
            recipients=[2, 0, 2, 1],
        )
    )
    assert frame.WhichOneof("frame") == "send"
    batch = frame.send
    assert batch.batch_id == 2**40 + 5
    assert [e.recipient.user for e in batch.envelopes] == ["user-2", "user-0", "user-2", "user-1"]
    assert [e.recipient.device for e in batch.envelopes] == [3, 1, 3, 2]
    for i, env in enumerate(batch.envelopes):
        assert env.message_id == message_id(b"RUN1", 3, 1000 + i)
        assert len(env.content) == 300
        header = parse_header(env.content)
        assert header is not None
        assert (header.worker, header.seq, header.intended_ns) == (3, 1000 + i, 123456789)
        assert header.recipient == [2, 0, 2, 1][i]
        assert not env.ephemeral


def test_ack_frame_round_trips() -> None:
    ids = [message_id(b"abcd", 1, n) for n in range(5)]
    frame = relay_pb2.ClientFrame.FromString(ack_frame(ids))
    assert list(frame.ack.message_ids) == ids


def test_parse_header_rejects_foreign_content() -> None:
    assert parse_header(b"short") is None
    assert parse_header(b"XX" + bytes(40)) is None
