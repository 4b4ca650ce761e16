"""The direct path across nodes: envelopes pushed, unstored, to a session on another node.

An envelope to a recipient whose receiving session is on another node may go direct
like one to a local session (``relay.core.sendorder`` decides when): the sending node
forwards it over the node link as an ``Offered`` with the epoch of the session presence
located, waits for a ``Notice`` of the device's ack and answers DELIVERED, or stores it
at its deadline (``limits.direct_ack_ms``) and answers STORED. The rules, on both ends:

1. **The sender believes only the node it sent to** (``RemoteWaits``): a direct notice
   counts only from that node and only while the envelope's wait is pending. Durable
   before ack holds whatever a peer says: without an ACKED notice in time the envelope
   is stored, and a lost forward or notice only costs a store write.
2. **The target offers a direct forward only to the session of its epoch**
   (``PeerOffers``): a device that reconnected elsewhere since the sender located it
   does not get it out of order with what its new session reads; the target reports
   not-acked at once (no such session, session full), so the sender stores it without
   waiting out its deadline, and again when the session ends before the device acked.
3. **The target holds a direct envelope ``HOLD_FACTOR`` x the sender's deadline**, then
   forgets it: an ack the device sends after that is taken as the ack of the stored copy,
   which its sender has written by then (so that copy is not delivered again).
4. **Acks of stored forwards** (``Pushed.report_ack``): the target watches the device's
   ack and reports it, which the sending stream's ``SendOrder`` takes as "acked as seen
   on this node" (its pair may go direct again). A false report could reorder that
   pair, never lose an envelope: links off loopback are mutual TLS (``relay.core.peers``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.core.direct import DirectBatch, DirectWait
from relay.core.ports import NodeLinks
from relay.core.sendorder import SendOrder
from relay.core.sessions import Session, SessionRegistry
from relay.model import Address, Envelope, Location, Notice, Offered

#: How much longer than the sender's deadline a target holds a direct envelope.
HOLD_FACTOR = 2
#: Direct envelopes a node waits on at once on other nodes (past it: stored at once).
MAX_REMOTE_WAITS = 100_000
#: Stored forwards whose acks a node watches on other nodes (oldest forgotten past it:
#: that pair stays on the store path a while longer).
MAX_REMOTE_WATCHES = 100_000

_WaitKey = tuple[str, Address, Address, bytes]
_WatchKey = tuple[Address, Address, bytes]


@dataclass(frozen=True, slots=True)
class RemoteSession:
    """The receiving session of ``recipient`` with ``epoch`` on node ``node_id``.

    A direct target like a local ``Session``: two are equal when they name the same
    session, which is what ``SendOrder`` checks to keep a pair's direct envelopes on one.
    """

    node_id: str
    epoch: int
    recipient: Address
    waits: RemoteWaits = field(compare=False, repr=False)

    def offer_direct(self, envelope: Envelope, wait: DirectWait) -> bool:
        """Forward ``envelope`` to the session unstored; False: refused (store it)."""
        return self.waits.offer(self, envelope, wait)

    def settle(self, wait: DirectWait) -> None:
        """The sender has acted on ``wait``'s outcome: stop listening for it."""
        self.waits.settle(self, wait)


class RemoteWaits:
    """The sending node's side: waits on other nodes' sessions, watched stored forwards."""

    def __init__(self, links: NodeLinks) -> None:
        self._links = links
        self._waits: dict[_WaitKey, DirectWait] = {}
        self._watched: OrderedDict[_WatchKey, SendOrder] = OrderedDict()

    def target(self, where: Location, recipient: Address) -> RemoteSession:
        """The direct target for ``recipient``'s session at ``where``."""
        return RemoteSession(where.node_id, where.epoch, recipient, self)

    def offer(self, target: RemoteSession, envelope: Envelope, wait: DirectWait) -> bool:
        """Forward ``envelope`` direct to ``target``; False if it cannot be waited on."""
        key = (target.node_id, envelope.recipient, envelope.sender, envelope.message_id)
        if key in self._waits or len(self._waits) >= MAX_REMOTE_WAITS:
            return False
        self._waits[key] = wait
        offered = Offered(envelope, target.epoch, wait.after_seq, wait.follows)
        self._links.offer(target.node_id, [offered])
        return True

    def settle(self, target: RemoteSession, wait: DirectWait) -> None:
        """Forget ``wait`` (resolved): later notices for it are ignored."""
        key = (target.node_id, target.recipient, wait.sender, wait.message_id)
        if self._waits.get(key) is wait:
            del self._waits[key]

    def watch(
        self, recipient: Address, sender: Address, message_id: bytes, order: SendOrder
    ) -> None:
        """Tell ``order`` when a node reports the device's ack of this stored forward."""
        key = (recipient, sender, message_id)
        self._watched[key] = order
        self._watched.move_to_end(key)
        while len(self._watched) > MAX_REMOTE_WATCHES:
            self._watched.popitem(last=False)

    def notices(self, peer: str, notices: Sequence[Notice]) -> int:
        """Apply what ``peer`` reports (rule 1); return how many notices were ignored."""
        ignored = 0
        for n in notices:
            if n.direct:
                wait = self._waits.get((peer, n.recipient, n.sender, n.message_id))
                if wait is None:
                    ignored += 1
                elif n.acked:
                    wait.acked()
                else:
                    wait.fail()
            elif n.acked:
                order = self._watched.pop((n.recipient, n.sender, n.message_id), None)
                if order is not None:
                    order.acked_stored(n.recipient, n.message_id)
        return ignored

    def __len__(self) -> int:
        return len(self._waits)


class _ReportingWait(DirectWait):
    """A direct envelope from another node: its outcome is reported back to that node."""

    __slots__ = ("_links", "_peer", "_recipient")

    def __init__(self, batch: DirectBatch, item: Offered, peer: str, links: NodeLinks) -> None:
        envelope = item.envelope
        super().__init__(
            batch,
            envelope.message_id,
            len(envelope.content),
            envelope.sender,
            item.after_seq,
            follows=item.follows,
        )
        self._links = links
        self._peer = peer
        self._recipient = envelope.recipient

    def acked(self) -> None:
        pending = self.pending
        super().acked()
        if pending:
            self._report(acked=True)

    def fail(self) -> None:
        pending = self.pending
        super().fail()
        if pending:
            self._report(acked=False)

    def _report(self, *, acked: bool) -> None:
        notice = Notice(self._recipient, self.sender, self.message_id, acked, direct=True)
        self._links.report(self._peer, [notice])


class PeerOffers:
    """The target node's side: direct forwards from peers, acks of stored ones reported."""

    def __init__(self, registry: SessionRegistry, links: NodeLinks, hold_seconds: float) -> None:
        self._registry = registry
        self._links = links
        self._hold = hold_seconds * HOLD_FACTOR
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(self, peer: str, items: Sequence[Offered]) -> None:
        """Offer ``peer``'s direct forwards to their sessions (rules 2 and 3)."""
        batch = DirectBatch()
        held: list[tuple[Session, DirectWait]] = []
        for item in items:
            env = item.envelope
            session = self._registry.get(env.recipient)
            wait = batch.join(_ReportingWait(batch, item, peer, self._links))
            if session is None or session.epoch != item.epoch or self._hold <= 0:
                wait.fail()
            elif session.offer_direct(env, wait):
                held.append((session, wait))
            else:
                wait.fail()
        if held:
            task = asyncio.get_running_loop().create_task(self._settle(batch, held))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle(self, batch: DirectBatch, held: list[tuple[Session, DirectWait]]) -> None:
        try:
            await batch.wait(self._hold)
        finally:
            for session, wait in held:
                session.settle(wait)

    def watch(self, peer: str, envelopes: Sequence[Envelope]) -> None:
        """Report the device's ack of these stored forwards to ``peer`` (rule 4)."""
        for env in envelopes:
            session = self._registry.get(env.recipient)
            if session is not None:
                session.watch(env.key, _PeerWatch(self._links, peer, env.sender))


@dataclass(frozen=True, slots=True)
class _PeerWatch:
    """Watches one stored forward's ack for the peer that forwarded it."""

    links: NodeLinks
    peer: str
    sender: Address

    def acked_stored(self, recipient: Address, message_id: bytes) -> None:
        notice = Notice(recipient, self.sender, message_id, acked=True, direct=False)
        self.links.report(self.peer, [notice])
