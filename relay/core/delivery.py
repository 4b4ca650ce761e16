"""The relay core: accept sends (durable before ack), open sessions, take acks.

Contract (DESIGN.md section 3): a send is answered only once every copy is acked by
its recipient device or durable; an envelope with a (sender, message id) seen before for
the same recipient is a duplicate (the same id from another sender is not: senders pick
ids, so no device can pre-claim another's, nor have it removed by an ack); ephemeral
envelopes reach only an online session and are never stored; limits reject with their
configuration name.

The direct path: an envelope to a device with a receiving session on this node is pushed
to it first and answered DELIVERED if the device acks it within ``limits.direct_ack_ms``;
otherwise (no ack in time, the session ended, the session is full) it is stored and
answered STORED. Which envelopes may go direct, so that each recipient sees each sender
in send order, is decided by the sender stream's ``SendOrder`` (its docstring has the rule).

A device removed from its user's device list (``Relay.device_removed``, told to every
node) loses its sessions on every node, its cached keys and its queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from relay.clock import Clock
from relay.config import LimitsConfig
from relay.core.direct import DirectBatch, DirectTarget, DirectWait, WaitState
from relay.core.peers import PeerInbox
from relay.core.ports import CoreMetrics, IdentityKeys, MessageQueue, NodeLinks, Presence
from relay.core.presence_local import LocalPresence, NoLinks
from relay.core.remote import PeerOffers, RemoteWaits
from relay.core.routing import Router
from relay.core.sendorder import Pair, SendOrder, Turn
from relay.core.sessions import Session, SessionRegistry
from relay.errors import (
    ClientError,
    DeviceRemoved,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RelayError,
)
from relay.model import (
    MESSAGE_ID_BYTES,
    Address,
    DeviceListMismatch,
    Envelope,
    EnvelopeKey,
    Location,
    Outcome,
    Pushed,
    QueueLimits,
    validate_user,
)

log = logging.getLogger(__name__)

#: Removed devices a node remembers (to refuse a session or send racing the removal).
MAX_REMEMBERED_REMOVALS = 100_000


@dataclass(slots=True)  # not frozen: made per envelope, and a frozen init costs 3x
class _Planned:
    """One envelope of a send after dispatch: direct (``wait`` set) or for the store."""

    index: int
    envelope: Envelope
    expires: int
    order: SendOrder
    pair: Pair
    wait: DirectWait | None = None
    session: DirectTarget | None = None
    #: Where the recipient's session is when it is on another node (located at dispatch).
    where: Location | None = None


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What happened to one envelope of a send; ``error`` is set when REJECTED."""

    message_id: bytes
    recipient: Address
    outcome: Outcome
    error: ClientError | None = None


class Relay:
    """Routes envelopes between device sessions on the embedded backends."""

    def __init__(
        self,
        *,
        queue: MessageQueue,
        identities: IdentityKeys,
        clock: Clock,
        limits: LimitsConfig,
        metrics: CoreMetrics,
        node_id: str = "relay-1",
        presence: Presence | None = None,
        links: NodeLinks | None = None,
        presence_cache_seconds: float = 0.0,
    ) -> None:
        self._queue = queue
        self._identities = identities
        self._clock = clock
        self._limits = limits
        self._metrics = metrics
        self._node_id = node_id
        self._presence: Presence = presence or LocalPresence()
        self._links: NodeLinks = links or NoLinks()
        self._registry = SessionRegistry()
        # Wake-ups routed by another node's stale cached location are lost; a session
        # re-reads once that cache has expired everywhere.
        self._first_repoll = (
            presence_cache_seconds + 1.0
            if presence_cache_seconds > 0
            else limits.session_repoll_seconds
        )
        self.router = Router(node_id, self._registry, self._presence, self._links)
        self._queue_limits = QueueLimits(limits.max_queue_depth, limits.max_queue_bytes)
        self._direct_seconds = limits.direct_ack_ms / 1000
        #: Direct envelopes this node pushed to sessions on other nodes.
        self.remote = RemoteWaits(self._links)
        #: What peer nodes send over their links, checked before it is acted on.
        self.peers = PeerInbox(
            self.router,
            self._registry,
            self._presence,
            clock,
            metrics,
            remote=self.remote,
            offers=PeerOffers(self._registry, self._links, self._direct_seconds),
        )
        #: Devices removed while this node ran, oldest first (bounded).
        self._removed: OrderedDict[Address, None] = OrderedDict()

    @property
    def sessions(self) -> SessionRegistry:
        """The receiving sessions on this node."""
        return self._registry

    async def send(
        self,
        sender: Address,
        envelopes: Sequence[Envelope],
        session: Session | None = None,
        *,
        turn: Turn | None = None,
    ) -> list[SendOutcome]:
        """Accept ``envelopes`` from ``sender``; one outcome per envelope, in order.

        ``session`` is the sender's own session, if it sends on one: its ``SendOrder``
        keeps this send in order with the session's others, and a receiving session's
        sends may take the direct path. ``turn`` is this send's place in that order,
        taken when its frame arrived (one is taken here otherwise).

        Raises LimitExceeded for a batch over ``max_batch_envelopes`` (nothing accepted)
        and Unavailable when the store is down (nothing acknowledged). Per-envelope
        problems are REJECTED outcomes carrying their error; the rest still go through.
        """
        order = session.order if session is not None else SendOrder(direct=False)
        if turn is None:
            turn = order.turn()
        try:
            self._check_batch(len(envelopes), "envelopes")
            started = time.perf_counter()
            outcomes = await self._send(sender, envelopes, order, turn)
            self._metrics.send_seconds(time.perf_counter() - started)
        finally:
            turn.resolved()
        for out in outcomes:
            self._metrics.envelope(out.outcome, out.error)
        return outcomes

    async def send_checked(
        self,
        sender: Address,
        envelopes: Sequence[Envelope],
        registration_ids: Sequence[int],
        complete_for: Sequence[tuple[str, str]],
        session: Session | None = None,
        *,
        turn: Turn | None = None,
    ) -> tuple[list[SendOutcome], list[DeviceListMismatch]]:
        """:meth:`send` with Sesame device-list checks for the (tenant, user)s in ``complete_for``.

        For each such user the envelopes to it must address every registered device of it
        (but ``sender`` itself), each with its current registration id
        (``registration_ids[i]`` for ``envelopes[i]``). Where they do not, none of the
        envelopes to that user is accepted (each is REJECTED with FailedPrecondition) and
        a DeviceListMismatch says why; the other envelopes go through as in :meth:`send`.

        The whole request is refused, before any device list is looked up, with
        LimitExceeded if the envelopes or the ``complete_for`` entries are more than
        ``max_batch_envelopes``, PermissionDenied if an entry names another tenant than
        the sender's (a device's or a service's: both send within their tenant only), and
        InvalidArgument if an entry is malformed or the registration ids do not match.
        """
        if turn is None:
            turn = (session.order if session is not None else SendOrder(direct=False)).turn()
        try:
            return await self._send_checked(
                sender, envelopes, registration_ids, complete_for, session=session, turn=turn
            )
        finally:
            turn.resolved()

    async def _send_checked(
        self,
        sender: Address,
        envelopes: Sequence[Envelope],
        registration_ids: Sequence[int],
        complete_for: Sequence[tuple[str, str]],
        *,
        session: Session | None,
        turn: Turn,
    ) -> tuple[list[SendOutcome], list[DeviceListMismatch]]:
        self._check_batch(len(envelopes), "envelopes")
        self._check_batch(len(complete_for), "complete_device_lists entries")
        for i, (tenant, user) in enumerate(complete_for):
            field = f"complete_device_lists[{i}]"
            if tenant != sender.tenant:
                raise PermissionDenied(
                    f"{field}.tenant is {tenant!r}; {sender} may only send within tenant "
                    f"{sender.tenant!r}"
                )
            validate_user(user, field=f"{field}.user")
        if len(registration_ids) != len(envelopes):
            raise InvalidArgument(
                f"{len(registration_ids)} registration ids for {len(envelopes)} envelopes"
            )
        checks = await asyncio.gather(
            *(
                self._check_devices(sender, tenant, user, envelopes, registration_ids)
                for tenant, user in set(complete_for)
            )
        )
        mismatches = [m for m in checks if m]
        refused = {(m.tenant, m.user): m for m in mismatches}
        if not refused:
            return await self.send(sender, envelopes, session, turn=turn), []
        keep = [
            i
            for i, e in enumerate(envelopes)
            if (e.recipient.tenant, e.recipient.user) not in refused
        ]
        accepted = await self.send(sender, [envelopes[i] for i in keep], session, turn=turn)
        results: list[SendOutcome] = []
        sent = iter(accepted)
        kept = set(keep)
        for i, env in enumerate(envelopes):
            if i in kept:
                results.append(next(sent))
                continue
            mismatch = refused[(env.recipient.tenant, env.recipient.user)]
            error = FailedPrecondition(mismatch.describe())
            results.append(SendOutcome(env.message_id, env.recipient, Outcome.REJECTED, error))
            self._metrics.envelope(Outcome.REJECTED, error)
        return results, mismatches

    def _check_batch(self, count: int, what: str) -> None:
        """Raise LimitExceeded naming max_batch_envelopes if ``count`` is over it."""
        limit = self._limits.max_batch_envelopes
        if count > limit:
            raise LimitExceeded(
                "max_batch_envelopes",
                limit,
                f"batch of {count} {what} is over limits.max_batch_envelopes ({limit}): split it",
            )

    async def _check_devices(
        self,
        sender: Address,
        tenant: str,
        user: str,
        envelopes: Sequence[Envelope],
        registration_ids: Sequence[int],
    ) -> DeviceListMismatch:
        addressed = {
            e.recipient.device: registration_ids[i]
            for i, e in enumerate(envelopes)
            if e.recipient.tenant == tenant and e.recipient.user == user
        }
        mismatch = DeviceListMismatch(tenant, user)
        for fresh in (False, True):  # a cached list may be behind: recheck before refusing
            registered: Mapping[int, int] = await self._identities.devices(
                tenant, user, fresh=fresh
            )
            if sender.tenant == tenant and sender.user == user:
                registered = {d: r for d, r in registered.items() if d != sender.device}
            mismatch = _compare(tenant, user, addressed, registered)
            if not mismatch:
                break
        return mismatch

    async def _send(
        self, sender: Address, envelopes: Sequence[Envelope], order: SendOrder, turn: Turn
    ) -> list[SendOutcome]:
        now = self._clock.now_ms()
        results: list[SendOutcome | None] = [None] * len(envelopes)
        ephemeral: list[tuple[int, Envelope]] = []
        plan: list[_Planned] = []
        batch = DirectBatch()
        try:
            known = await self._registered({e.recipient for e in envelopes})
            accepted: list[tuple[int, Envelope, int]] = []
            for i, raw in enumerate(envelopes):
                try:
                    env, ttl = self._check(i, sender, raw, known, now)
                except ClientError as exc:
                    results[i] = SendOutcome(raw.message_id, raw.recipient, Outcome.REJECTED, exc)
                    continue
                if env.ephemeral:
                    ephemeral.append((i, env))
                else:
                    accepted.append((i, env, now + ttl * 1000))
            located = await self._locate_remote(order, accepted)
            await turn.dispatch_turn()
            plan.extend(self._dispatch(order, turn, batch, item, located) for item in accepted)
        finally:
            turn.dispatched()
        await turn.resolve_turn()
        live: list[Pushed] = []
        if plan:
            live = await self._resolve(plan, batch, results)
        if ephemeral:
            live.extend(Pushed(env) for _, env in ephemeral)
        # Located again, not from _locate_remote: only a lookup after the append sees a
        # session that claimed the device meanwhile (its first read may have missed it).
        online = await self.router.route(live) if live else set()
        for i, env in ephemeral:
            outcome = Outcome.DELIVERED if env.recipient in online else Outcome.RECIPIENT_OFFLINE
            results[i] = SendOutcome(env.message_id, env.recipient, outcome)
        return [r for r in results if r is not None]

    async def _locate_remote(
        self, order: SendOrder, accepted: list[tuple[int, Envelope, int]]
    ) -> Mapping[Address, Location]:
        """Where the recipients without a session here are, if this stream may go direct.

        Located for stored envelopes too: their node reports their acks, which make the
        pair clean (``relay.core.remote``, rule 4).
        """
        if not (order.direct and self._links.remote and self._direct_seconds > 0):
            return {}
        away = {
            env.recipient for _, env, _ in accepted if self._registry.get(env.recipient) is None
        }
        if not away:
            return {}
        located = await self.router.locate(away)
        return {a: w for a, w in located.items() if w.node_id != self._node_id}

    def _dispatch(
        self,
        order: SendOrder,
        turn: Turn,
        batch: DirectBatch,
        planned: tuple[int, Envelope, int],
        located: Mapping[Address, Location],
    ) -> _Planned:
        """Push the envelope direct if its pair allows it, else plan it for the store path."""
        i, env, expires = planned
        pair = order.pair(env.recipient)
        turn.follow(pair)
        target: DirectTarget | None = None
        where = located.get(env.recipient)
        if self._direct_seconds > 0:
            target = self._registry.get(env.recipient)
            if target is None and where is not None:
                target = self.remote.target(where, env.recipient)
        if target is not None and order.may_go_direct(pair, target):
            wait = batch.add(
                env.message_id,
                len(env.content),
                env.sender,
                order.after_seq(pair),
                follows=order.follows(pair),
            )
            if target.offer_direct(env, wait):
                pair.session = target
                pair.outstanding += 1
                pair.last_direct = env.message_id
                return _Planned(i, env, expires, order, pair, wait, target, where)
            wait.fail()
        pair.clean = False
        pair.storing += 1
        return _Planned(i, env, expires, order, pair, where=where)

    async def _resolve(
        self, plan: list[_Planned], batch: DirectBatch, results: list[SendOutcome | None]
    ) -> list[Pushed]:
        """Wait for the direct envelopes' acks, store the rest in order; the pushes to make."""
        if batch.waits:
            await batch.wait(self._direct_seconds)
        store: list[_Planned] = []
        try:
            for p in plan:
                if p.wait is None:
                    store.append(p)
                    continue
                p.pair.outstanding -= 1
                if p.wait.state is WaitState.ACKED:
                    if not p.pair.storing and not p.pair.missed:
                        # Delivered after whatever it had to follow (``after_seq``): the
                        # pair's next direct envelopes need follow nothing but it.
                        p.pair.clean = True
                    results[p.index] = SendOutcome(
                        p.envelope.message_id, p.envelope.recipient, Outcome.DELIVERED
                    )
                    self._metrics.copy(direct=True)
                else:
                    p.pair.clean = False
                    p.pair.missed = True
                    p.pair.storing += 1
                    store.append(p)
            if not store:
                return []
            return await self._store(store, results)
        finally:
            for p in plan:
                if p.wait is not None and p.session is not None:
                    p.session.settle(p.wait)

    async def _store(
        self, store: list[_Planned], results: list[SendOutcome | None]
    ) -> list[Pushed]:
        try:
            appended = await self._queue.append(
                [p.envelope for p in store], [p.expires for p in store], self._queue_limits
            )
        finally:
            for p in store:
                p.pair.storing -= 1
        live: list[Pushed] = []
        late: dict[Address, list[EnvelopeKey]] = {}
        for p, result in zip(store, appended, strict=True):
            env = p.envelope
            error = None
            if result.outcome is Outcome.REJECTED:
                error = self._queue_full(env.recipient, result.limit)
            else:
                p.pair.watching = env.message_id
                if p.wait is not None and p.wait.late_ack:
                    late.setdefault(env.recipient, []).append(env.key)
                    p.order.acked_stored(env.recipient, env.message_id)
                elif result.outcome is Outcome.STORED:
                    there = self._registry.get(env.recipient)
                    report = there is None and p.where is not None
                    live.append(Pushed(env, result.seq, p.pair.last_seq, report_ack=report))
                    if there is not None:
                        there.watch(env.key, p.order)
                    elif report:
                        self.remote.watch(env.recipient, env.sender, env.message_id, p.order)
                if result.outcome is Outcome.STORED:
                    p.pair.last_seq = result.seq
                    self._metrics.copy(direct=False)
                elif result.outcome is Outcome.DUPLICATE:
                    p.pair.last_seq = 0  # its copy's seq is unknown: only its ack anchors
            results[p.index] = SendOutcome(env.message_id, env.recipient, result.outcome, error)
        for recipient, ids in late.items():
            # Acked while it was being stored: the device holds it, drop the stored copy.
            with contextlib.suppress(RelayError):
                await self._queue.ack(recipient, ids)
        await self._purge_removed({p.envelope.recipient for p in store})
        return live

    async def _registered(self, recipients: set[Address]) -> set[Address]:
        valid = [r for r in recipients if _is_valid(r) and r not in self._removed]
        keys = await asyncio.gather(*(self._identities.identity_key(r) for r in valid))
        return {r for r, key in zip(valid, keys, strict=True) if key is not None}

    def _check(
        self, i: int, sender: Address, env: Envelope, known: set[Address], now: int
    ) -> tuple[Envelope, int]:
        field = f"envelopes[{i}]"
        if len(env.message_id) != MESSAGE_ID_BYTES:
            raise InvalidArgument(
                f"{field}.message_id has {len(env.message_id)} bytes; it must be "
                f"{MESSAGE_ID_BYTES} random bytes"
            )
        if env.recipient not in known:  # known ones were validated (``_registered``)
            env.recipient.validate(field=f"{field}.recipient")
        if env.recipient.tenant != sender.tenant:
            raise PermissionDenied(
                f"{field}.recipient is in tenant {env.recipient.tenant!r}; "
                f"{sender} may only send within tenant {sender.tenant!r}"
            )
        limit = self._limits.max_envelope_bytes
        if len(env.content) > limit:
            raise LimitExceeded(
                "max_envelope_bytes",
                limit,
                f"{field}.content has {len(env.content)} bytes, over "
                f"limits.max_envelope_bytes ({limit})",
            )
        if env.recipient not in known:
            raise NotFound(f"{field}.recipient {env.recipient} is not a registered device")
        ttl = env.ttl_seconds or self._limits.default_ttl_seconds
        if ttl > self._limits.max_ttl_seconds:
            raise InvalidArgument(
                f"{field}.ttl_seconds {ttl} is over limits.max_ttl_seconds "
                f"({self._limits.max_ttl_seconds})"
            )
        # Made whole, not dataclasses.replace: this runs for every envelope sent.
        env = Envelope(env.message_id, sender, env.recipient, env.content, env.ephemeral, ttl, now)
        return env, ttl

    def _queue_full(self, recipient: Address, limit: str) -> LimitExceeded:
        value = (
            self._limits.max_queue_depth
            if limit == "max_queue_depth"
            else self._limits.max_queue_bytes
        )
        return LimitExceeded(
            limit,
            value,
            f"queue of {recipient} is full (limits.{limit} = {value}); "
            "retry after the device has read its messages",
        )

    async def open_session(self, address: Address, *, receive: bool) -> Session:
        """Start a session of an authenticated device; a receiving one displaces the old.

        A receiving session claims the device in presence first and is attached before
        its first queue read, so every envelope stored from then on is either in that
        read or routed to it.
        """
        now = self._clock.now_ms()
        epoch, previous = 0, None
        if receive:
            epoch, previous = await self._presence.claim(address, self._node_id, now)
        if address in self._removed:
            # Authenticated just before the removal reached this node: no await between
            # this check and attaching, so device_removed either sees the session or
            # is seen here.
            if receive:
                await self._release(address, epoch)
            raise _removed_error(address)
        session = Session(
            address,
            epoch,
            receive=receive,
            queue=self._queue,
            clock=self._clock,
            page_size=self._limits.delivery_page,
            repoll_seconds=self._limits.session_repoll_seconds,
            first_repoll_seconds=self._first_repoll,
            max_inflight=self._limits.max_session_inflight_envelopes,
            max_inflight_bytes=self._limits.max_session_inflight_bytes,
        )
        if receive:
            if self._registry.attach(session) is not None:
                self._metrics.displaced()
            if previous is not None and previous.node_id != self._node_id:
                self._links.displace(previous.node_id, address, epoch)
        else:
            self._registry.add_sender(session)
        self._metrics.session(receive=receive, opened=True)
        return session

    @contextlib.asynccontextmanager
    async def session(self, address: Address, *, receive: bool) -> AsyncIterator[Session]:
        """``open_session`` ... ``close_session``: the session is released however it ends.

        Whatever happens once it is open (a failed write, a cancelled stream), leaving the
        block ends the session (failing its direct waits) and releases its presence entry.
        """
        session = await self.open_session(address, receive=receive)
        try:
            yield session
        finally:
            session.close()
            await self.close_session(session)

    async def close_session(self, session: Session) -> None:
        """Forget a session that ended, for whatever reason (never raises)."""
        self._metrics.session(receive=session.receive, opened=False)
        if not session.receive:
            self._registry.remove_sender(session)
            return
        if self._registry.get(session.address) is not session:
            return
        self._registry.detach(session)
        await self._release(session.address, session.epoch)

    async def _release(self, address: Address, epoch: int) -> None:
        try:
            await self._presence.release(address, self._node_id, epoch)
        except RelayError as exc:
            log.info("presence release of %s failed (its entry expires): %s", address, exc)

    async def device_removed(self, device: Address) -> int:
        """``device`` left its user's device list: act on it here; return envelopes purged.

        Every node is told of every removal and does all of this itself, so it holds
        wherever the device's sessions are and whichever node it tries next:

        1. remember the address as removed (the key directory never registers it again),
           so that a session or send that raced the removal is refused;
        2. forget its cached identity key and its user's cached device list, so a new
           Connect asks the key directory (and is refused: UNAUTHENTICATED);
        3. end each of its sessions on this node, receiving and send-only, with
           DeviceRemoved (their streams close with PERMISSION_DENIED / DEVICE_REMOVED;
           each is forgotten by ``close_session`` as its stream ends);
        4. purge its queue (idempotent: other nodes purge it at the same time).

        Steps 1-3 happen before the first await. Raises Unavailable if the store is
        down (then the envelopes expire by their TTL, unless another node purged them).
        """
        self._removed[device] = None
        self._removed.move_to_end(device)
        while len(self._removed) > MAX_REMEMBERED_REMOVALS:
            self._removed.popitem(last=False)
        self._identities.forget(device)
        error = _removed_error(device)
        for session in self._registry.of_device(device):
            session.end(error)
        return await self._queue.purge(device)

    async def _purge_removed(self, recipients: set[Address]) -> None:
        """Purge again the queues of recipients removed while a send was appending.

        The send itself succeeded: a failed purge is logged, not raised (the envelopes
        then expire with their TTL).
        """
        for device in recipients & self._removed.keys():
            try:
                await self._queue.purge(device)
            except RelayError as exc:
                log.warning("purge of removed device %s after a send failed: %s", device, exc)

    async def ack(self, session: Session, message_ids: Sequence[bytes]) -> int:
        """Take the device's acks: end direct waits, remove stored envelopes from its queue.

        Only the session's own queue is touched (never anyone else's), and in it only
        the (sender, message_id) keys this session delivered with the acked ids
        (``Session.acked``): ids it never delivered are ignored. Returns how many stored
        envelopes were removed.
        """
        for mid in message_ids:
            if len(mid) != MESSAGE_ID_BYTES:
                raise InvalidArgument(
                    f"ack names a message_id of {len(mid)} bytes; ids have {MESSAGE_ID_BYTES}"
                )
        stored = session.acked(message_ids)
        if not stored:
            return 0
        removed = await self._queue.ack(session.address, stored)
        session.removed(stored)
        self._metrics.acked(removed)
        return removed

    async def purge_expired(self) -> int:
        """Delete expired envelopes; return how many."""
        return await self._queue.purge_expired(self._clock.now_ms())


def _removed_error(device: Address) -> DeviceRemoved:
    return DeviceRemoved(
        f"device {device} was removed from the device list of {device.tenant}/{device.user}; "
        "its sessions are ended and it cannot connect again: do not reconnect (register or "
        "link the device anew)",
        metadata={"device": str(device)},
    )


def _is_valid(address: Address) -> bool:
    try:
        address.validate()
    except InvalidArgument:
        return False
    return True


def _compare(
    tenant: str, user: str, addressed: Mapping[int, int], registered: Mapping[int, int]
) -> DeviceListMismatch:
    return DeviceListMismatch(
        tenant,
        user,
        missing=tuple(sorted(registered.keys() - addressed.keys())),
        extra=tuple(sorted(addressed.keys() - registered.keys())),
        stale=tuple(
            sorted(d for d in addressed.keys() & registered.keys() if addressed[d] != registered[d])
        ),
    )
