"""The owner of one sender stream's send order: FIFO per (sender -> recipient device).

Every stream a device sends on (and every unary ``Send``) has one ``SendOrder``. The
relay handles the stream's batches concurrently (pipelined) but in two ordered steps
(``Turn``):

1. **dispatch**, in the order the batches arrived: each envelope goes the *direct* path
   (pushed to the recipient's receiving session now, not stored) or the *store* path
   (appended, then pushed);
2. **resolve**, in that order *per recipient*: wait for the direct envelopes' acks
   (``limits.direct_ack_ms``), append the store-path envelopes together with the direct
   ones that were not acked, in the order they were sent, and answer. A batch waits only
   for earlier batches that share a recipient with it, so one slow device does not hold
   back the answers for the others.

The rule that keeps a recipient device's view of one sender in send order, whatever the
mix of paths: an envelope to recipient R may go direct only when

- the stream sends on the device's receiving session (one per device, so no other stream
  of it interleaves), and R has a receiving session, on this node or (located through
  presence) on another one (``relay.core.remote``), and
- no store-path envelope of the pair is still being appended, and the pair has not
  *missed* (a direct envelope of it went unacked: a slow or stalled device) since it was
  last *clean*. The direct envelope then names what R's session must deliver before it
  (``DirectWait.after_seq``, see ``Session``): nothing when the pair is clean (the latest
  store-path envelope of it has been acked by R, as seen on this node or reported by R's
  node; a device acks in queue order), else the seq of the pair's latest stored envelope
  (``last_seq``: delivered first, or gone because acked), else, for a new stream's first
  envelope to R, ``FRESH_READ``: a queue read of R's session begun after the offer, so
  whatever the queue holds from earlier streams of the sender comes first. No sender
  waits for an ack to come back before it goes direct, and
- every direct envelope of the pair still unresolved went to that same session (so the
  session's own FIFO orders them; one node link, itself FIFO, carries them to a remote
  one), and each names the one before it (``DirectWait.follows``): a session that never
  got that one (the link lost it) or dropped it unwritten (its deadline passed first)
  does not deliver the later ones, which fail and are stored after it.

Otherwise the envelope takes the store path and the pair is unclean until that
envelope's ack is seen (a missed pair goes direct again only then). Store-path envelopes
of a pair are appended in send order (the resolve step is ordered), and a direct
envelope that fails is appended before anything sent after it. A session delivers direct
envelopes only when it has no queue re-read pending (``Session``), so stored envelopes
from before come first.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.core.direct import FRESH_READ
from relay.model import Address

if TYPE_CHECKING:
    from relay.core.direct import DirectTarget

#: Recipients whose pair state a stream keeps, most recently used (the oldest idle one is
#: forgotten past it: unclean again, its next envelope is stored, which costs speed, never
#: order). Bounds a stream's memory at a few tens of KB however many devices it sends to.
MAX_PAIRS_PER_STREAM = 256


@dataclass(slots=True)
class Pair:
    """What one sender stream knows about its envelopes to one recipient device."""

    clean: bool = False
    #: The latest stored envelope of the pair: its ack makes the pair clean again.
    watching: bytes = b""
    #: Store-path envelopes dispatched and not yet appended (the pair is not clean).
    storing: int = 0
    #: Where the unresolved direct envelopes of the pair went, and how many there are.
    session: DirectTarget | None = None
    outstanding: int = 0
    #: A direct envelope of the pair went unacked (a slow or stalled device): only a
    #: clean pair goes direct again, so a slow reader is not made to time out each one.
    missed: bool = False
    #: Seq of the latest envelope stored to the recipient (``Pushed.prev_seq`` of the next);
    #: 0 when unknown (none yet, or the latest was a duplicate of one stored before).
    last_seq: int = 0
    #: Message id of the latest envelope of the pair that went direct.
    last_direct: bytes = b""
    #: Resolution of the latest batch with an envelope of the pair (the next one waits).
    resolving: asyncio.Future[None] | None = None

    @property
    def idle(self) -> bool:
        """Nothing of the pair is in flight: forgetting it loses nothing but speed."""
        return (
            self.outstanding == 0
            and self.storing == 0
            and (self.resolving is None or self.resolving.done())
        )


class Turn:
    """One batch's place in its stream's order (taken before its first await)."""

    __slots__ = ("_after", "_dispatched", "_prev_dispatched", "_resolved")

    def __init__(self, prev: Turn | None) -> None:
        loop = asyncio.get_running_loop()
        self._prev_dispatched = prev._dispatched if prev is not None else None
        self._dispatched: asyncio.Future[None] = loop.create_future()
        self._resolved: asyncio.Future[None] = loop.create_future()
        self._after: list[asyncio.Future[None]] = []

    async def dispatch_turn(self) -> None:
        """Wait until every earlier batch of the stream has dispatched."""
        if self._prev_dispatched is not None and not self._prev_dispatched.done():
            await self._prev_dispatched
        self._prev_dispatched = None

    def dispatched(self) -> None:
        """This batch has dispatched (or given up): the next may."""
        if not self._dispatched.done():
            self._dispatched.set_result(None)

    def follow(self, pair: Pair) -> None:
        """This batch has an envelope of ``pair``: it resolves after the pair's previous one."""
        prev = pair.resolving
        if prev is not self._resolved:
            if prev is not None and not prev.done():
                self._after.append(prev)
            pair.resolving = self._resolved

    async def resolve_turn(self) -> None:
        """Wait until every earlier batch sharing a recipient with this one has resolved."""
        for prev in self._after:
            if not prev.done():
                await asyncio.shield(prev)  # a cancelled wait must not cancel theirs
        self._after.clear()

    def resolved(self) -> None:
        """This batch has resolved (or given up): the next may."""
        self.dispatched()
        if not self._resolved.done():
            self._resolved.set_result(None)


class SendOrder:
    """Send order of one sender stream (see the module docstring for the rule)."""

    def __init__(self, *, direct: bool) -> None:
        #: Whether this stream may use the direct path at all (receiving sessions only).
        self.direct = direct
        self._pairs: OrderedDict[Address, Pair] = OrderedDict()
        self._last: Turn | None = None

    def turn(self) -> Turn:
        """The next batch's turn; take it in arrival order, before any await."""
        self._last = turn = Turn(self._last)
        return turn

    def pair(self, recipient: Address) -> Pair:
        """The state of the pair with ``recipient`` (new pairs start unclean)."""
        pair = self._pairs.get(recipient)
        if pair is None:
            pair = self._pairs[recipient] = Pair()
            if len(self._pairs) > MAX_PAIRS_PER_STREAM:
                self._forget_idle()
        else:
            self._pairs.move_to_end(recipient)
        return pair

    def may_go_direct(self, pair: Pair, session: DirectTarget | None) -> bool:
        """Whether the next envelope of ``pair`` may be pushed to ``session`` unstored."""
        if not self.direct or session is None or pair.storing:
            return False
        if pair.missed and not pair.clean:
            return False
        return pair.outstanding == 0 or pair.session == session

    @staticmethod
    def after_seq(pair: Pair) -> int:
        """What a direct envelope of ``pair`` must follow (``DirectWait.after_seq``).

        0 when the pair is clean (nothing of it waits), its latest stored envelope's seq
        when that is known, else FRESH_READ (whatever the queue holds from before).
        """
        if pair.clean:
            return 0
        return pair.last_seq or FRESH_READ

    @staticmethod
    def follows(pair: Pair) -> bytes:
        """What a direct envelope of ``pair`` must come right after (``DirectWait.follows``).

        The pair's latest direct envelope while any is unresolved (it may still be lost or
        dropped unwritten), else nothing.
        """
        return pair.last_direct if pair.outstanding else b""

    def acked_stored(self, recipient: Address, message_id: bytes) -> None:
        """The recipient acked a store-path envelope of this stream.

        The pair is clean only if that envelope is still the latest stored one: not while
        a later one is being appended (``storing``), whose ack is the one to wait for.
        (Regression: an ack reported while the next envelopes' append was in flight made
        the pair clean; with their wake-ups lost, the next direct envelope overtook them.)
        """
        pair = self._pairs.get(recipient)
        if pair is not None and pair.watching == message_id and not pair.storing:
            pair.clean = True
            pair.missed = False
            pair.watching = b""

    def _forget_idle(self) -> None:
        for recipient, pair in self._pairs.items():
            if pair.idle:
                del self._pairs[recipient]
                return
