"""Hand-encoded ClientFrames, and what the generator puts inside each envelope.

The generator writes tens of thousands of envelopes a second from one Python process, so
SendBatch and AckBatch frames are built as protobuf bytes directly (the per-recipient
parts are encoded once) rather than as message objects; ``tests/loadtest`` checks that
``relay_pb2`` parses them back to the same fields. Frames from the server are parsed with
the generated (C) parser.

Message id (16 bytes): run tag (4) | sender worker (2) | zero (2) | sequence (8).
Content: header (24 bytes: magic ``LT``, sender worker, sequence, intended send time in
ns on CLOCK_MONOTONIC, recipient index) followed by padding up to the payload size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relaypb.common.v1 import address_pb2

MESSAGE_ID = struct.Struct(">4sHHQ")
HEADER = struct.Struct(">2sHQQI")
MAGIC = b"LT"
MIN_PAYLOAD = HEADER.size
_MID_TAG = b"\x0a\x10"  # Envelope.message_id, 16 bytes


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field ``tag`` (wire type 2)."""
    return varint(tag << 3 | 2) + varint(len(payload)) + payload


def message_id(run_tag: bytes, worker: int, seq: int) -> bytes:
    """The 16-byte message id of envelope ``seq`` of ``worker`` in the run ``run_tag``."""
    return MESSAGE_ID.pack(run_tag, worker, 0, seq)


def encode_address(tenant: str, user: str, device: int) -> bytes:
    """Serialized ``relaypb.common.v1.Address``."""
    return address_pb2.Address(tenant=tenant, user=user, device=device).SerializeToString()


@dataclass(frozen=True, slots=True)
class RecipientParts:
    """Pre-encoded pieces of an envelope to one recipient (everything but id and content)."""

    prefix: bytes  # Envelope field tag + length, then the message_id tag
    middle: bytes  # recipient field, then the content tag + length


class BatchEncoder:
    """Builds SendBatch ClientFrames of fixed-size envelopes without protobuf objects."""

    def __init__(self, recipients: Sequence[bytes], payload_bytes: int, padding: bytes) -> None:
        """``recipients``: serialized Address per recipient index; ``padding``: filler bytes."""
        if payload_bytes < MIN_PAYLOAD:
            raise ValueError(f"payload must be at least {MIN_PAYLOAD} bytes (the header)")
        pad_len = payload_bytes - HEADER.size
        if len(padding) < pad_len:
            raise ValueError("padding shorter than payload minus header")
        self.padding = padding[:pad_len]
        content_tag = b"\x22" + varint(payload_bytes)
        self.parts: list[RecipientParts] = []
        for addr in recipients:
            middle = _field(3, addr) + content_tag
            body_len = len(_MID_TAG) + 16 + len(middle) + payload_bytes
            self.parts.append(RecipientParts(b"\x12" + varint(body_len) + _MID_TAG, middle))

    def send_frame(
        self,
        batch_id: int,
        *,
        run_tag: bytes,
        worker: int,
        first_seq: int,
        intended_ns: int,
        recipients: Sequence[int],
    ) -> bytes:
        """ClientFrame{send: SendBatch} with one envelope per entry of ``recipients``.

        Envelope ``i`` has sequence ``first_seq + i`` and goes to recipient index
        ``recipients[i]``; all carry ``intended_ns`` in their header.
        """
        chunks: list[bytes] = [b"\x08", varint(batch_id)]
        pack_id, pack_header, parts, pad = MESSAGE_ID.pack, HEADER.pack, self.parts, self.padding
        for i, r in enumerate(recipients):
            seq = first_seq + i
            p = parts[r]
            chunks += (
                p.prefix,
                pack_id(run_tag, worker, 0, seq),
                p.middle,
                pack_header(MAGIC, worker, seq, intended_ns, r),
                pad,
            )
        body = b"".join(chunks)
        return b"\x1a" + varint(len(body)) + body


def ack_frame(message_ids: Iterable[bytes]) -> bytes:
    """ClientFrame{ack: AckBatch{message_ids}}."""
    body = b"".join(b"\x0a" + varint(len(m)) + m for m in message_ids)
    return b"\x22" + varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class Header:
    """The generator's header at the start of an envelope's content."""

    worker: int
    seq: int
    intended_ns: int
    recipient: int


def parse_header(content: bytes) -> Header | None:
    """The header of ``content``, or None if it is not one of the generator's envelopes."""
    if len(content) < HEADER.size:
        return None
    magic, worker, seq, intended, recipient = HEADER.unpack_from(content)
    if magic != MAGIC:
        return None
    return Header(worker, seq, intended, recipient)
