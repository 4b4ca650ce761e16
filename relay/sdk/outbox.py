"""Sends in flight: batches waiting for their SendResults frame, kept across reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from relay.errors import InvalidArgument, RelayError, Status
from relay.model import MESSAGE_ID_BYTES, Address, DeviceListMismatch, Outcome
from relay.sdk.codec import Codec
from relay.sdk.directory import from_pb, to_pb
from relay.sdk.keys import new_message_id
from relay.sdk.status import error_for
from relaypb.relay.v1 import relay_pb2

_OUTCOMES = {o.value: o for o in Outcome}


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to send: ``message_id`` is random when None."""

    recipient: Address
    content: bytes
    message_id: bytes | None = None
    ephemeral: bool = False
    ttl_seconds: int = 0


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """The relay's answer for one envelope.

    ``outcome`` STORED, DELIVERED or DUPLICATE (an earlier attempt with the same id was
    accepted: typical after a reconnect) mean the relay has it; RECIPIENT_OFFLINE is an
    ephemeral envelope dropped as asked; REJECTED carries ``error`` (e.g. a
    :class:`~relay.errors.LimitExceeded` naming the limit).
    """

    message_id: bytes
    recipient: Address
    outcome: Outcome
    error: RelayError | None = None

    @property
    def ok(self) -> bool:
        """Whether the envelope was accepted (anything but REJECTED)."""
        return self.error is None

    def raise_for_error(self) -> SendReceipt:
        """Raise ``error`` if the envelope was rejected; else return self."""
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The relay's answer to one SendBatch: receipts in order, device-list mismatches."""

    receipts: list[SendReceipt]
    mismatches: list[DeviceListMismatch]


@dataclass(slots=True)
class _Batch:
    frame: relay_pb2.ClientFrame
    future: asyncio.Future[BatchResult]
    #: The session this batch was last written on.
    written_on: object = field(default=None)


class Outbox:
    """Batches sent (or to send) whose results have not come back, in submission order."""

    def __init__(self) -> None:
        self._next_id = 1
        self._pending: dict[int, _Batch] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def submit(
        self,
        envelopes: Sequence[relay_pb2.Envelope],
        complete_for: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, asyncio.Future[BatchResult]]:
        """Queue one SendBatch; its future resolves with one receipt per envelope.

        ``complete_for``: (tenant, user)s whose whole device list the batch addresses.
        """
        batch_id = self._next_id
        self._next_id += 1
        users = [relay_pb2.UserRef(tenant=t, user=u) for t, u in complete_for]
        frame = relay_pb2.ClientFrame(
            send=relay_pb2.SendBatch(
                batch_id=batch_id, envelopes=envelopes, complete_device_lists=users
            )
        )
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = _Batch(frame, future)
        return batch_id, future

    def discard(self, batch_id: int) -> None:
        """Stop waiting for a batch (its sender gave up); it is not resent."""
        self._pending.pop(batch_id, None)

    def take_unwritten(self, session: object) -> Iterator[relay_pb2.ClientFrame]:
        """Frames of batches not yet written on ``session``, oldest first, marked written."""
        while True:
            batch = next((b for b in self._pending.values() if b.written_on is not session), None)
            if batch is None:
                return
            batch.written_on = session
            yield batch.frame

    def resolve(self, results: relay_pb2.SendResults) -> None:
        """Complete the batch answered by ``results`` (unknown batch ids are ignored)."""
        batch = self._pending.pop(results.batch_id, None)
        if batch is None or batch.future.done():
            return
        envelopes = batch.frame.send.envelopes
        if len(results.results) != len(envelopes):
            batch.future.set_exception(
                RelayError(
                    f"relay answered {len(results.results)} results for "
                    f"{len(envelopes)} envelopes of batch {results.batch_id}"
                )
            )
            return
        pairs = zip(envelopes, results.results, strict=True)
        mismatches = [
            DeviceListMismatch(
                m.user.tenant,
                m.user.user,
                tuple(m.missing_devices),
                tuple(m.extra_devices),
                tuple(m.stale_devices),
            )
            for m in results.device_list_mismatches
        ]
        batch.future.set_result(BatchResult([_receipt(e, r) for e, r in pairs], mismatches))

    def fail_all(self, error: BaseException) -> None:
        """Fail every pending batch with ``error``."""
        for batch in self._pending.values():
            if not batch.future.done():
                batch.future.set_exception(error)
        self._pending.clear()


def sealed_envelope(message: OutgoingMessage, codec: Codec) -> relay_pb2.Envelope:
    """The envelope of ``message``: content sealed by ``codec``, a random id if none."""
    message_id = message.message_id or new_message_id()
    if len(message_id) != MESSAGE_ID_BYTES:
        raise InvalidArgument(f"message_id must be {MESSAGE_ID_BYTES} bytes")
    return relay_pb2.Envelope(
        message_id=message_id,
        recipient=to_pb(message.recipient),
        content=codec.seal(message.recipient, message.content),
        ephemeral=message.ephemeral,
        ttl_seconds=message.ttl_seconds,
    )


def _receipt(envelope: relay_pb2.Envelope, result: relay_pb2.SendResult) -> SendReceipt:
    recipient = from_pb(envelope.recipient)
    outcome = _OUTCOMES.get(result.outcome, Outcome.REJECTED)
    error = None
    if outcome is Outcome.REJECTED:
        code = result.code or Status.UNKNOWN
        message = result.message or f"relay rejected the envelope to {recipient}"
        error = error_for(code, message, metadata={"limit": result.limit} if result.limit else None)
    return SendReceipt(envelope.message_id, recipient, outcome, error)
