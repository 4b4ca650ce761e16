"""Device sessions on this node, and the events a receiving session yields.

A receiving session first yields every stored envelope (in queue order, page by page),
then one QueueEmpty marker, then new envelopes as they are appended. New envelopes are
read back from the store after a wake-up rather than handed over in memory: the store
is the single source of order, so a session never skips or reorders what was stored.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from relay.clock import Clock
from relay.core.ports import MessageQueue
from relay.errors import SessionDisplaced
from relay.model import Address, Envelope

#: Ephemeral envelopes buffered per session; older ones are dropped past it
#: (they are typing indicators and the like, never stored by contract).
MAX_EPHEMERAL_BUFFER = 256


@dataclass(frozen=True, slots=True)
class Deliver:
    """A batch of envelopes for the device, in queue order."""

    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class QueueEmpty:
    """Everything stored when the session started has been delivered."""


SessionEvent = Deliver | QueueEmpty


class Session:
    """One authenticated session of one device on this node."""

    def __init__(
        self,
        address: Address,
        epoch: int,
        *,
        receive: bool,
        queue: MessageQueue,
        clock: Clock,
        page_size: int,
    ) -> None:
        self.address = address
        self.epoch = epoch
        self.receive = receive
        self._queue = queue
        self._clock = clock
        self._page = page_size
        self._wake = asyncio.Event()
        self._displaced = False
        self._ephemeral: deque[Envelope] = deque(maxlen=MAX_EPHEMERAL_BUFFER)

    @property
    def displaced(self) -> bool:
        """Whether a newer session of the same device replaced this one."""
        return self._displaced

    def wake(self) -> None:
        """Tell the session that its queue may have grown."""
        self._wake.set()

    def displace(self) -> None:
        """End the session: its event stream raises SessionDisplaced."""
        self._displaced = True
        self._wake.set()

    def push_ephemeral(self, envelope: Envelope) -> None:
        """Hand an ephemeral envelope to the session (never stored)."""
        self._ephemeral.append(envelope)
        self._wake.set()

    async def events(self) -> AsyncIterator[SessionEvent]:
        """Yield stored envelopes, then QueueEmpty, then live envelopes, until displaced.

        Pulling drives the store reads, so a slow consumer slows the reads (backpressure)
        instead of growing a buffer. Raises SessionDisplaced when displaced.
        """
        cursor = 0
        while True:
            page = await self._queue.read(self.address, cursor, self._page, self._clock.now_ms())
            cursor = page.cursor
            if page.items:
                yield Deliver(tuple(item.envelope for item in page.items))
            if not page.more:
                break
        yield QueueEmpty()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._displaced:
                raise SessionDisplaced(
                    f"session of {self.address} was displaced by a newer session of the "
                    "same device; not reconnecting is the right response"
                )
            if self._ephemeral:
                batch = tuple(self._ephemeral)
                self._ephemeral.clear()
                yield Deliver(batch)
            more = True
            while more:
                page = await self._queue.read(
                    self.address, cursor, self._page, self._clock.now_ms()
                )
                cursor, more = page.cursor, page.more
                if page.items:
                    yield Deliver(tuple(item.envelope for item in page.items))


class SessionRegistry:
    """The receiving sessions open on this node, one per device at most."""

    def __init__(self) -> None:
        self._sessions: dict[Address, Session] = {}
        self._epochs: dict[Address, int] = {}

    def next_epoch(self, address: Address, now_ms: int) -> int:
        """A session epoch for ``address`` larger than any before it on this node."""
        epoch = max(self._epochs.get(address, 0) + 1, now_ms)
        self._epochs[address] = epoch
        return epoch

    def attach(self, session: Session) -> Session | None:
        """Make ``session`` the device's receiving session; displace and return the old one."""
        old = self._sessions.get(session.address)
        self._sessions[session.address] = session
        if old is not None:
            old.displace()
        return old

    def detach(self, session: Session) -> None:
        """Forget ``session`` if it is still the device's current one."""
        if self._sessions.get(session.address) is session:
            del self._sessions[session.address]

    def get(self, address: Address) -> Session | None:
        """The receiving session of ``address`` on this node, if any."""
        return self._sessions.get(address)

    def __len__(self) -> int:
        return len(self._sessions)
