"""What other relay nodes say over their links, and how much of it this node acts on.

A node link (``relay/server/links.py``) carries batches from one peer node, each with
up to three kinds of item. The rules for believing them live here, whatever carried them:

1. **Who speaks.** A link whose transport authenticated its peer (mutual TLS, the node id
   named in the peer's certificate) speaks for that node only: a batch claiming to be
   from another node, or from a certificate that names no node, is refused with
   PermissionDenied and nothing in it is applied. An unauthenticated link (plaintext,
   which the server allows on loopback only) is taken at its word.
2. **Displace** ends a session here only if presence, read fresh at that moment (never
   from a cache), holds a newer session of the device: local epoch < claimed epoch <=
   epoch in presence. Normally the claimed epoch is presence's (the peer has just made
   that claim); one already overtaken by a still newer session still ends the older
   session here, which is superseded either way. A claimed epoch above presence's (a
   forged one, e.g. huge) or for a device presence holds nothing for is ignored, so no
   peer can end a device's newest session.
3. **repoll_all** makes every session here re-read its queue, one store read each, so
   each peer gets ``REPOLL_BURST`` of them, refilled one per ``REPOLL_REFILL_MS``.
   The excess is ignored: sessions also re-read on a timer, so a lost re-read only
   delays an envelope, never loses one.
4. **Forwards** go to the router. A session delivers a forwarded envelope directly only
   when its ``prev_seq`` proves it next in order, so a peer that can forward can also
   deliver what it likes: that is why links off loopback need mutual TLS.
5. **Direct forwards and notices** (the direct path across nodes) follow the rules of
   ``relay.core.remote``: a direct forward reaches only the session of the epoch it
   names; a notice ends only a wait this node holds on that very peer.

Everything ignored is counted in ``relay_link_refused_total{reason}`` and logged at most
once per ``LOG_INTERVAL_MS`` per peer and reason (with the count since the last line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.clock import Clock
from relay.core.ports import CoreMetrics, Presence
from relay.core.remote import PeerOffers, RemoteWaits
from relay.core.routing import Router
from relay.core.sessions import SessionRegistry
from relay.errors import InvalidArgument, PermissionDenied, RelayError
from relay.model import Address, Notice, Offered, Pushed

log = logging.getLogger(__name__)

#: repoll_all requests a peer may make at once, and how fast it earns another.
REPOLL_BURST = 4
REPOLL_REFILL_MS = 5_000
#: Peers tracked one by one; past that, the rest share one bucket (memory stays bounded
#: whatever names an unauthenticated link claims).
MAX_PEERS = 256
#: At most one log line per peer and reason per this long.
LOG_INTERVAL_MS = 60_000
_OVERFLOW = "*"


class TokenBucket:
    """``burst`` tokens, one more every ``refill_ms`` (up to ``burst``); a take spends one."""

    def __init__(self, burst: int, refill_ms: int, now_ms: int) -> None:
        self._burst = burst
        self._refill_ms = refill_ms
        self._tokens = float(burst)
        self._at = now_ms

    def take(self, now_ms: int) -> bool:
        """Spend a token if there is one; return whether there was."""
        if now_ms > self._at:  # a clock stepped back earns nothing
            self._tokens = min(self._burst, self._tokens + (now_ms - self._at) / self._refill_ms)
            self._at = now_ms
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class _Peer:
    repolls: TokenBucket
    #: reason -> (items ignored since the last log line, time of that line)
    ignored: dict[str, tuple[int, int]] = field(default_factory=dict)


class PeerInbox:
    """Applies what peer nodes send over their links, by the rules of this module."""

    def __init__(
        self,
        router: Router,
        sessions: SessionRegistry,
        presence: Presence,
        clock: Clock,
        metrics: CoreMetrics,
        *,
        remote: RemoteWaits,
        offers: PeerOffers,
    ) -> None:
        self._remote = remote
        self.offers = offers
        self._router = router
        self._sessions = sessions
        self._presence = presence
        self._clock = clock
        self._metrics = metrics
        self._peers: dict[str, _Peer] = {}

    def admit(self, claimed: str, certified: str | None, *, authenticated: bool) -> str:
        """The peer a batch claiming to be from node ``claimed`` is accepted as.

        ``authenticated``: the link's transport verified the peer's certificate, which
        names node ``certified`` (None: it names no node). Raises PermissionDenied if an
        authenticated peer claims another node than its certificate's, InvalidArgument
        if ``claimed`` is empty.
        """
        if not claimed:
            raise InvalidArgument("NodeBatch.from_node is empty: a batch names its node")
        if authenticated and certified != claimed:
            self._metrics.link_refused("peer_identity")
            self._note(claimed, "peer_identity", f"its certificate names node {certified!r}")
            raise PermissionDenied(
                f"this link's certificate names node {certified!r}, not {claimed!r}: "
                "a node link speaks only for the node its certificate names"
            )
        return claimed

    def accept(self, peer: str, items: Sequence[Pushed]) -> None:
        """Envelopes ``peer`` forwards for sessions here (see rule 4)."""
        taken = self._router.accept(items)
        watched = [i.envelope for i in taken if i.report_ack]
        if watched:
            self.offers.watch(peer, watched)

    def offer(self, peer: str, items: Sequence[Offered]) -> None:
        """Direct (unstored) envelopes ``peer`` pushes to sessions here (see rule 5)."""
        self.offers.offer(peer, items)

    def notices(self, peer: str, notices: Sequence[Notice]) -> None:
        """What ``peer`` reports of envelopes this node forwarded to it (see rule 5)."""
        ignored = self._remote.notices(peer, notices)
        if ignored:
            self._metrics.link_refused("notice_late")

    def repoll_all(self, peer: str) -> bool:
        """``peer`` asks every session here to re-read; return whether they were told to."""
        if self._peer(peer).repolls.take(self._clock.now_ms()):
            self._router.reread_all()
            return True
        self._metrics.link_refused("repoll_rate")
        self._note(
            peer,
            "repoll_rate",
            f"repoll_all over its budget ({REPOLL_BURST}, one more per "
            f"{REPOLL_REFILL_MS // 1000} s); sessions re-read on their timer",
        )
        return False

    async def displace(self, peer: str, device: Address, epoch: int) -> bool:
        """``peer`` says a session of ``device`` with ``epoch`` took over; return if one ended.

        See rule 2. A presence store that cannot be read leaves the session open (and
        is logged): the device's newest session may be this one.
        """
        session = self._sessions.get(device)
        if session is None or session.epoch >= epoch:
            return False  # nothing older here to end
        try:
            current = await self._presence.current(device)
        except RelayError as exc:
            log.warning("displacement of %s by %s not checked, session kept: %s", device, peer, exc)
            return False
        if current is None or epoch > current.epoch:
            self._metrics.link_refused("displace_epoch")
            held = "no entry" if current is None else f"epoch {current.epoch}"
            self._note(
                peer, "displace_epoch", f"Displace of {device} to {epoch}; presence holds {held}"
            )
            return False
        return self._router.displace(device, epoch)

    def _peer(self, peer: str) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= MAX_PEERS:
                peer = _OVERFLOW
                state = self._peers.get(peer)
            if state is None:
                bucket = TokenBucket(REPOLL_BURST, REPOLL_REFILL_MS, self._clock.now_ms())
                state = self._peers[peer] = _Peer(bucket)
        return state

    def _note(self, peer: str, reason: str, what: str) -> None:
        """Log an ignored item, at most once per LOG_INTERVAL_MS per peer and reason."""
        state = self._peer(peer)
        now = self._clock.now_ms()
        count, logged_at = state.ignored.get(reason, (0, -LOG_INTERVAL_MS))
        count += 1
        if now - logged_at < LOG_INTERVAL_MS:
            state.ignored[reason] = (count, logged_at)
            return
        state.ignored[reason] = (0, now)
        log.warning(
            "ignored from node link peer %r: %s (%d such since the last report)", peer, what, count
        )
