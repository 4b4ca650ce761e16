"""Waiting for a recipient's ack of an envelope pushed before it was stored.

A ``DirectWait`` is one envelope pushed to a receiving session (``Session.offer_direct``)
and not stored. It ends in exactly one of two states: ACKED (the recipient device acked
it: the send is answered DELIVERED, nothing is stored) or FAILED (no ack before the
deadline, the session ended, or the push was refused: the envelope is stored and the
send is answered STORED). An ack that arrives after FAILED is remembered
(``late_ack``): the sender stores the envelope, then acks it in the queue, so the copy
the device already holds is not delivered again.

A ``DirectBatch`` gathers the waits of one SendBatch and resolves once every one of
them has ended, or at its deadline (which fails those still pending).

No reference cycle outlives a send: a wait lets go of its batch once it has ended and
the batch lets go of its timer and future once it has waited, so both are freed by
reference counting. (They were the relay's main cyclic garbage: tens of thousands of
objects a second at load, and the collector's pauses were latency spikes for every
stream.)
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol

from relay.model import Address, Envelope

#: ``DirectWait.after_seq`` of a direct envelope whose pair has no known stored envelope
#: (a new stream's first to a device): the session delivers it only after a queue read
#: begun after it was offered, so whatever the queue holds from before comes first.
FRESH_READ = (1 << 63) - 1


class WaitState(enum.Enum):
    """Where a pushed envelope stands."""

    PENDING = enum.auto()
    ACKED = enum.auto()
    FAILED = enum.auto()


class DirectWait:
    """One envelope pushed to a session, waiting for the device's ack."""

    __slots__ = (
        "_batch",
        "after_seq",
        "follows",
        "late_ack",
        "message_id",
        "read_gen",
        "sender",
        "size",
        "state",
    )

    def __init__(
        self,
        batch: DirectBatch,
        message_id: bytes,
        size: int,
        sender: Address,
        after_seq: int = 0,
        *,
        follows: bytes = b"",
    ) -> None:
        self._batch: DirectBatch | None = batch
        self.message_id = message_id
        self.size = size
        self.sender = sender
        #: Seq of the latest envelope of the same pair that was stored before this one (0:
        #: none may still wait): the session delivers this one only after that one.
        self.after_seq = after_seq
        #: Message id of the previous direct envelope of the pair, if it was unresolved
        #: when this one was sent: the session takes this one only right after that one.
        self.follows = follows
        #: The receiving session's count of queue reads begun when it took this one.
        self.read_gen = 0
        self.state = WaitState.PENDING
        #: The device acked it after it had FAILED (it holds a copy: ack the stored one).
        self.late_ack = False

    @property
    def pending(self) -> bool:
        """Neither acked nor failed yet."""
        return self.state is WaitState.PENDING

    def acked(self) -> None:
        """The recipient device acked the envelope."""
        if self.state is WaitState.PENDING:
            self.state = WaitState.ACKED
            self._ended()
        elif self.state is WaitState.FAILED:
            self.late_ack = True

    def fail(self) -> None:
        """No ack will count any more (deadline, session ended, push refused)."""
        if self.state is WaitState.PENDING:
            self.state = WaitState.FAILED
            self._ended()

    def _ended(self) -> None:
        batch, self._batch = self._batch, None  # no cycle with the batch once ended
        if batch is not None:
            batch.one_done()


class DirectTarget(Protocol):
    """Where a direct envelope goes: a local ``Session`` or one on another node.

    Two targets compare equal when they are the same receiving session.
    """

    def offer_direct(self, envelope: Envelope, wait: DirectWait) -> bool:
        """Push ``envelope`` unstored; ``wait`` ends with the device's ack. False: refused."""
        ...

    def settle(self, wait: DirectWait) -> None:
        """The sender has acted on ``wait``'s outcome: forget it."""
        ...


class DirectBatch:
    """The direct waits of one send; ``wait`` returns once all have ended."""

    __slots__ = ("_future", "_pending", "_timer", "waits")

    def __init__(self) -> None:
        self.waits: list[DirectWait] = []
        self._pending = 0
        self._future: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(
        self,
        message_id: bytes,
        size: int,
        sender: Address,
        after_seq: int = 0,
        *,
        follows: bytes = b"",
    ) -> DirectWait:
        """A new pending wait of this batch (``after_seq``, ``follows``: see ``DirectWait``)."""
        return self.join(DirectWait(self, message_id, size, sender, after_seq, follows=follows))

    def join(self, wait: DirectWait) -> DirectWait:
        """Count ``wait`` (made with this batch, still pending) among this batch's waits."""
        self.waits.append(wait)
        self._pending += 1
        return wait

    def one_done(self) -> None:
        """A wait of this batch ended (called by ``DirectWait``)."""
        self._pending -= 1
        if self._pending == 0 and self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def wait(self, timeout_seconds: float) -> None:
        """Wait until every wait has ended, failing those still pending after the timeout."""
        if self._pending == 0:
            return
        loop = asyncio.get_running_loop()
        self._future = loop.create_future()
        self._timer = loop.call_later(timeout_seconds, self.expire)
        try:
            await self._future
        finally:
            self._timer.cancel()
            self._timer = self._future = None  # both refer back to the batch
            self.expire()  # cancelled: nothing pending may still count as delivered

    def expire(self) -> None:
        """Fail every wait still pending."""
        for wait in self.waits:
            if wait.state is WaitState.PENDING:
                wait.fail()
