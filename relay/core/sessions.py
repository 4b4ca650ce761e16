"""Device sessions on this node, and the events a receiving session yields.

A receiving session first yields every stored envelope (in queue order, page by page),
then one QueueEmpty marker, then live envelopes as they are pushed to it (from this node
or, over node links, from others), re-reading its queue whenever order cannot be proven.

Envelopes pushed *direct* (not stored, ``offer_direct``) are delivered in the order they
were offered, but never ahead of a pending re-read (whatever the queue holds from before
comes first), nor ahead of the stored envelope of their pair they must follow
(``DirectWait.after_seq``: the session re-reads until it has delivered it, or until a
read begun after the offer has completed without it, i.e. it was acked), nor ahead of
a direct envelope of their sender that this session never took (a lost forward) or
dropped unwritten (its sender stored it at its deadline): ``DirectWait.follows`` names
the previous direct envelope of the pair, and a session takes an offer only right after
that one; when one is dropped unwritten, the later direct envelopes of its sender held
here fail, so their senders store them after it. Their senders wait for the device's
ack (``relay.core.direct``); a session that ends fails every wait it holds at once, so
those envelopes are stored. Pushed and unacked envelopes are bounded per session by
count and bytes: past either, a direct offer is refused (the sender
stores it) and stored pushes are left to the next re-read.

Any session (receiving or send-only) can be ended from outside with the error its
stream must close with: ``displace`` (a newer session of the device took over) or
``end`` (e.g. the device was removed). Whoever serves the session waits on ``ended``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.clock import Clock
from relay.core.direct import DirectWait
from relay.core.ports import MessageQueue
from relay.core.sendorder import SendOrder
from relay.errors import ClientError, SessionDisplaced
from relay.model import Address, Envelope, EnvelopeKey, Pushed

#: Ephemeral envelopes buffered per session; older ones are dropped past it
#: (they are typing indicators and the like, never stored by contract).
MAX_EPHEMERAL_BUFFER = 256
#: Store-path acks a session watches for its senders' order (``SendOrder``); past it a
#: sender's pair simply stays on the store path a while longer.
MAX_WATCHED_ACKS = 4096
#: Senders whose last direct envelope a session remembers (``DirectWait.follows``); an
#: offer that names a forgotten one is refused (it is stored: speed, never order).
MAX_DIRECT_SENDERS = 4096
#: Content bytes per Deliver frame (a frame carries at least one envelope); well under
#: the 16 MiB message limit of the servers and the SDK.
MAX_DELIVER_FRAME_BYTES = 4 * 1024 * 1024


class AckWatcher(Protocol):
    """Told when the device acks a stored envelope it watches (a ``SendOrder``, or a peer's)."""

    def acked_stored(self, recipient: Address, message_id: bytes) -> None:
        """``recipient`` acked the stored envelope ``message_id``."""
        ...


@dataclass(frozen=True, slots=True)
class Deliver:
    """A batch of envelopes for the device, in queue order.

    ``live``: pushed to the session (direct, or stored and pushed), not read from the queue.
    """

    envelopes: tuple[Envelope, ...]
    live: bool = False


@dataclass(frozen=True, slots=True)
class QueueEmpty:
    """Everything stored when the session started has been delivered."""


SessionEvent = Deliver | QueueEmpty


class Session:
    """One authenticated session of one device on this node.

    A receiving session delivers live envelopes handed to it (``push``) directly when it
    can prove they are next in order from their sender (``Pushed.prev_seq`` equals the
    seq it last delivered from that sender session), and otherwise re-reads its queue,
    which the store keeps in order. A lost wake-up therefore delays an envelope until the
    next read, but never reorders or loses one.
    """

    def __init__(
        self,
        address: Address,
        epoch: int,
        *,
        receive: bool,
        queue: MessageQueue,
        clock: Clock,
        page_size: int,
        repoll_seconds: float = 30.0,
        first_repoll_seconds: float | None = None,
        max_inflight: int = 1024,
        max_inflight_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.epoch = epoch
        self.receive = receive
        self._queue = queue
        self._clock = clock
        self._page = page_size
        self._repoll_seconds = repoll_seconds
        self._first_repoll = (
            repoll_seconds if first_repoll_seconds is None else first_repoll_seconds
        )
        self._wake = asyncio.Event()
        self._end: ClientError | None = None
        self._closed = False
        self._ended = asyncio.Event()
        self._reread = False
        self._pending: list[Pushed] = []
        #: Content bytes of the stored envelopes in ``_pending`` (direct ones: ``_direct_bytes``).
        self._pending_bytes = 0
        #: Made at the first ephemeral envelope (an empty deque costs 760 bytes, and
        #: most streams never get one).
        self._ephemeral: deque[Envelope] | None = None
        #: Keys delivered in this session and not seen removed yet (never delivered twice
        #: here), as message id -> its senders: an ack names ids only (``acked``).
        self._delivered: dict[bytes, set[Address]] = {}
        #: Per sender: seq of the last envelope delivered from it.
        self._last_from: dict[Address, int] = {}
        #: The send order of this session's own sends (direct path for receiving ones).
        self.order = SendOrder(direct=receive)
        self._max_inflight = max_inflight
        self._max_inflight_bytes = max_inflight_bytes
        #: Direct envelopes offered and not resolved, by key.
        self._direct: dict[EnvelopeKey, DirectWait] = {}
        #: Direct envelopes this session holds memory for: unresolved, or still in
        #: ``_pending`` (not yet written to the device), with their sizes; and the bytes.
        self._held: dict[EnvelopeKey, int] = {}
        self._queued: dict[EnvelopeKey, None] = {}  # a set: an empty dict is 64 B, a set 216
        self._direct_bytes = 0
        #: Per sender: message id of the last direct envelope this session took from it
        #: (b"" once one was dropped unwritten: none may follow it), oldest sender first.
        #: Made at the first direct offer: an idle stream costs nothing for it.
        self._last_direct: dict[Address, bytes] | None = None
        #: Store-path envelopes whose ack a sender stream waits to see.
        self._watched: dict[EnvelopeKey, AckWatcher] = {}
        #: Queue reads begun, and the count of reads begun before the latest one that
        #: completed (a direct envelope taken before that read began follows what it read).
        self._reads_begun = 0
        self._reads_done = 0
        #: Where the next queue read starts (``MessageQueue.resume_point`` of the last).
        self._resume = 0

    @property
    def displaced(self) -> bool:
        """Whether a newer session of the same device replaced this one."""
        return isinstance(self._end, SessionDisplaced)

    @property
    def end_error(self) -> ClientError | None:
        """Why the session was ended from outside (None while it may go on)."""
        return self._end

    def push(self, items: Sequence[Pushed]) -> None:
        """Hand live envelopes (already durable, or ephemeral) to the session."""
        for item in items:
            if item.envelope.ephemeral:
                if self._ephemeral is None:
                    self._ephemeral = deque(maxlen=MAX_EPHEMERAL_BUFFER)
                self._ephemeral.append(item.envelope)
            elif (
                len(self._pending) < self._max_inflight
                and self._pending_bytes + len(item.envelope.content) <= self._max_inflight_bytes
            ):
                self._pending.append(item)
                self._pending_bytes += len(item.envelope.content)
            else:
                self._reread = True  # it is stored: the re-read delivers it in order
        self._wake.set()

    def offer_direct(self, envelope: Envelope, wait: DirectWait) -> bool:
        """Take an envelope that is not stored, to deliver in offer order; False: refused.

        Refused when the session has ended or holds its limit of unacked envelopes (by
        count or bytes), or when an envelope of the same (sender, message_id) is offered
        and unresolved; the caller then stores it. Accepted, ``wait`` ends when the
        device acks it (ACKED) or the session ends (FAILED). Envelopes of one id from
        two senders are two offers (waits are keyed by (sender, message_id)).
        """
        key = envelope.key
        if self._closed or key in self._held:
            return False
        if (
            len(self._held) >= self._max_inflight
            or self._direct_bytes + wait.size > self._max_inflight_bytes
        ):
            return False
        last = self._last_direct
        if wait.follows and (last is None or last.get(envelope.sender) != wait.follows):
            return False  # the one before it was lost, refused or dropped: it goes first
        if last is None:
            last = self._last_direct = {}
        last.pop(envelope.sender, None)  # to the end: most recent last
        last[envelope.sender] = envelope.message_id
        if len(last) > MAX_DIRECT_SENDERS:
            del last[next(iter(last))]
        self._direct[key] = wait
        self._held[key] = wait.size
        self._direct_bytes += wait.size
        wait.read_gen = self._reads_begun
        self._queued[key] = None
        self._pending.append(Pushed(envelope, direct=True))
        self._wake.set()
        return True

    def settle(self, wait: DirectWait) -> None:
        """Forget a resolved direct envelope (its sender has acted on the outcome)."""
        key = EnvelopeKey(wait.sender, wait.message_id)
        if self._direct.get(key) is wait:
            del self._direct[key]
            if key not in self._queued:
                self._release(key)

    def watch(self, key: EnvelopeKey, order: AckWatcher) -> None:
        """Tell ``order`` when the device acks this stored envelope (see ``SendOrder``)."""
        if len(self._watched) < MAX_WATCHED_ACKS:
            self._watched[key] = order

    def reread(self) -> None:
        """Make the session re-read its queue (wake-ups may have been lost)."""
        self._reread = True
        self._wake.set()

    def displace(self, by_epoch: int) -> None:
        """End the session: a newer one of the device, of epoch ``by_epoch``, took over.

        The SessionDisplaced error names ``by_epoch`` (metadata ``session_epoch``) so that
        the device can tell it from its own session's epoch (``Ready.session_epoch``):
        only a newer one makes not reconnecting the right response.
        """
        self.end(
            SessionDisplaced(
                f"session {self.epoch} of {self.address} was displaced by a newer session "
                f"({by_epoch}) of the same device; not reconnecting is the right response",
                metadata={"session_epoch": str(by_epoch), "device": str(self.address)},
            )
        )

    def end(self, error: ClientError) -> None:
        """End the session with ``error``: ``events`` and ``ended`` raise it.

        The first end wins; later ones are ignored.
        """
        if self._end is None:
            self._end = error
        self._ended.set()
        self._wake.set()
        self.close()

    def close(self) -> None:
        """The session's stream is gone: fail its direct waits (their senders store them)."""
        self._closed = True
        for wait in self._direct.values():
            wait.fail()
        self._watched.clear()

    def removed(self, keys: Sequence[EnvelopeKey]) -> None:
        """Acked keys are gone from the queue: a re-read cannot deliver them again."""
        for key in keys:
            self._forget_delivered(key)

    async def ended(self) -> None:
        """Wait until the session is ended from outside, then raise why."""
        await self._ended.wait()
        assert self._end is not None
        raise self._end

    def acked(self, message_ids: Sequence[bytes]) -> list[EnvelopeKey]:
        """The device acked ``message_ids``; return the keys to remove from its queue.

        The device names ids only: each id stands for the (sender, message_id) keys this
        session delivered with it and has not seen removed (normally one; one per sender
        if several senders used the id). An id this session never delivered is ignored,
        so a device cannot remove an envelope it was not given here (it is delivered,
        and acked, again). Acks of direct envelopes end their waits (their senders
        answer DELIVERED, nothing was stored: no queue work); acks of watched stored
        envelopes tell their senders.
        """
        stored: list[EnvelopeKey] = []
        for mid in dict.fromkeys(message_ids):
            for sender in tuple(self._delivered.get(mid, ())):
                key = EnvelopeKey(sender, mid)
                wait = self._direct.get(key)
                if wait is not None:
                    self._forget_delivered(key)
                    wait.acked()  # PENDING: delivered; FAILED: its sender acks the stored copy
                    continue
                stored.append(key)  # still "delivered" until the queue has removed it
                order = self._watched.pop(key, None)
                if order is not None:
                    order.acked_stored(self.address, mid)
        return stored

    def _was_delivered(self, envelope: Envelope) -> bool:
        return envelope.sender in self._delivered.get(envelope.message_id, ())

    def _mark_delivered(self, envelope: Envelope) -> None:
        self._delivered.setdefault(envelope.message_id, set()).add(envelope.sender)

    def _forget_delivered(self, key: EnvelopeKey) -> None:
        senders = self._delivered.get(key.message_id)
        if senders is not None:
            senders.discard(key.sender)
            if not senders:
                del self._delivered[key.message_id]

    async def events(self) -> AsyncIterator[SessionEvent]:
        """Yield stored envelopes, then QueueEmpty, then live envelopes, until ended.

        Pulling drives the store reads, so a slow consumer slows the reads (backpressure)
        instead of growing a buffer. Raises the end error (SessionDisplaced when
        displaced) once the session is ended.
        """
        async for stored in self._read_queue():
            yield stored
        self._raise_if_ended()
        yield QueueEmpty()
        loop = asyncio.get_running_loop()
        # The first re-read comes once other nodes' cached locations of this device have
        # expired (a wake-up sent to where it was before is lost); then one per period,
        # counted from the last read, however busy the session is.
        reread_at = loop.time() + self._first_repoll
        while True:
            wait = reread_at - loop.time()
            if wait > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            if loop.time() >= reread_at:
                self._reread = True  # the periodic safety net
            self._wake.clear()
            self._raise_if_ended()
            if self._ephemeral:
                ephemeral = tuple(self._ephemeral)
                self._ephemeral.clear()
                for frame in _frames(ephemeral, live=True):
                    yield frame
            for frame in _frames(self._take_in_order(), live=True):
                yield frame
            if self._reread:
                self._reread = False
                reread_at = loop.time() + self._repoll_seconds
                async for deliver in self._read_queue():
                    yield deliver
                if self._pending:
                    self._wake.set()  # direct envelopes held back by the re-read

    def _raise_if_ended(self) -> None:
        if self._end is not None:
            raise self._end

    def _take_in_order(self) -> tuple[Envelope, ...]:
        """Pending envelopes provably next in order; on any gap, ask for a re-read.

        Stored envelopes need proof (``prev_seq``) or wait for the re-read, which reads
        them from the queue; direct ones are not in the queue, so they stay pending
        until no re-read is due.
        """
        out: list[Envelope] = []
        held: list[Pushed] = []
        dropped: set[Address] = set()
        for item in self._pending:
            env = item.envelope
            if item.direct:
                wait = self._direct.get(env.key)
                if wait is None or env.sender in dropped:
                    # Settled by its sender unwritten (it is stored), or after one that
                    # was: it and the later ones of its sender go to the store after it.
                    self._dequeue(env.key)
                    if wait is not None:
                        wait.fail()
                    dropped.add(env.sender)
                    if self._last_direct is not None:  # it was taken: never None here
                        self._last_direct[env.sender] = b""
                    continue
                if not self._follows(wait):
                    held.append(item)
                    self._reread = True  # the stored one before it is in the queue
                elif self._reread:
                    held.append(item)  # the stored ones from before go first
                else:
                    self._dequeue(env.key)
                    if not self._was_delivered(env):
                        out.append(env)
                        self._mark_delivered(env)
                continue
            in_order = item.prev_seq != 0 and self._last_from.get(env.sender) == item.prev_seq
            if self._was_delivered(env):
                if in_order:
                    self._last_from[env.sender] = item.seq  # delivered direct already
                continue
            if not in_order:
                self._reread = True  # it is in the store: the read delivers it in order
                continue
            if self._reread:
                continue  # something before it must come from the store first
            out.append(env)
            self._mark_delivered(env)
            self._last_from[env.sender] = item.seq
        self._pending = held
        self._pending_bytes = 0
        return tuple(out)

    def _dequeue(self, key: EnvelopeKey) -> None:
        """A direct envelope left ``_pending``; its memory goes once its wait is settled too."""
        self._queued.pop(key, None)
        if key not in self._direct:
            self._release(key)

    def _release(self, key: EnvelopeKey) -> None:
        size = self._held.pop(key, None)
        if size is not None:
            self._direct_bytes -= size

    def _follows(self, wait: DirectWait) -> bool:
        """Whether the stored envelope a direct one must follow (``after_seq``) is behind it.

        It is when this session has delivered it (or a later one of its sender), or when
        a queue read that began after the direct one was taken has completed: that read
        found it, unless it was acked (it is appended before the direct one is offered).
        """
        if wait.after_seq == 0 or self._last_from.get(wait.sender, 0) >= wait.after_seq:
            return True
        return self._reads_done > wait.read_gen

    async def _read_queue(self) -> AsyncIterator[Deliver]:
        """Everything unacked in the queue that this session has not delivered, in order.

        Reads on from where the last complete read ended (``MessageQueue.resume_point``),
        not from the start: what lies before it was delivered in this session.
        """
        gen = self._reads_begun
        self._reads_begun += 1
        cursor = self._resume
        while True:
            self._raise_if_ended()
            page = await self._queue.read(self.address, cursor, self._page, self._clock.now_ms())
            cursor = page.cursor
            fresh = []
            for item in page.items:
                env = item.envelope
                if item.seq > self._last_from.get(env.sender, 0):
                    self._last_from[env.sender] = item.seq
                if self._was_delivered(env):
                    continue
                fresh.append(env)
                self._mark_delivered(env)
            for frame in _frames(fresh):
                yield frame
            if not page.more:
                self._reads_done = max(self._reads_done, gen + 1)
                self._resume = max(self._resume, self._queue.resume_point(cursor))
                return


def _frames(envelopes: Sequence[Envelope], *, live: bool = False) -> list[Deliver]:
    """``envelopes`` as Deliver frames of at most MAX_DELIVER_FRAME_BYTES of content each."""
    frames: list[Deliver] = []
    start, size = 0, 0
    for i, env in enumerate(envelopes):
        if i > start and size + len(env.content) > MAX_DELIVER_FRAME_BYTES:
            frames.append(Deliver(tuple(envelopes[start:i]), live))
            start, size = i, 0
        size += len(env.content)
    if start < len(envelopes):
        frames.append(Deliver(tuple(envelopes[start:]), live))
    return frames


class SessionRegistry:
    """The sessions open on this node: receiving (one per device) and send-only.

    Send-only sessions are kept only so that they can be ended (a device removal).
    """

    def __init__(self) -> None:
        self._sessions: dict[Address, Session] = {}
        self._senders: dict[Address, set[Session]] = {}

    def attach(self, session: Session) -> Session | None:
        """Make ``session`` the device's receiving session; displace and return the old one."""
        old = self._sessions.get(session.address)
        self._sessions[session.address] = session
        if old is not None:
            old.displace(session.epoch)
        return old

    def detach(self, session: Session) -> None:
        """Forget ``session`` if it is still the device's current one."""
        if self._sessions.get(session.address) is session:
            del self._sessions[session.address]

    def add_sender(self, session: Session) -> None:
        """Track a send-only session until ``remove_sender``."""
        self._senders.setdefault(session.address, set()).add(session)

    def remove_sender(self, session: Session) -> None:
        """Stop tracking a send-only session (if tracked)."""
        senders = self._senders.get(session.address)
        if senders is not None:
            senders.discard(session)
            if not senders:
                del self._senders[session.address]

    def of_device(self, address: Address) -> list[Session]:
        """Every session of ``address`` here: the receiving one (if any), then send-only ones."""
        receiving = self._sessions.get(address)
        return [*([receiving] if receiving is not None else []), *self._senders.get(address, ())]

    def every(self) -> list[Session]:
        """Every session on this node: receiving ones, then send-only ones."""
        return [*self._sessions.values(), *(s for group in self._senders.values() for s in group)]

    def get(self, address: Address) -> Session | None:
        """The receiving session of ``address`` on this node, if any."""
        return self._sessions.get(address)

    def all(self) -> list[Session]:
        """Every receiving session on this node."""
        return list(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)
