"""Node-to-node links: long-lived gRPC streams carrying batches of live traffic.

One outbound stream per peer node, opened lazily and reopened after failures. Callers
only append to a bounded buffer; a task per peer drains it into ``NodeBatch`` messages
(as many items per message as are waiting, up to ``MAX_BATCH``). Stored forwards are
already durable and a direct forward's sender stores it unless the peer's ``Notice`` of
the device's ack comes back in time (``relay.core.remote``), so a full buffer or a broken
stream drops wake-ups and costs store writes, never envelopes; the first batch after a
(re)connect says ``repoll_all`` so the peer's sessions re-read their queues.

Links run on each node's link listener (``node.link_listen``), never on the device port.
With ``[tls]`` configured they are mutual TLS: a node dials its peers with its own
certificate (which names its node id, ``relay.common.tls.NODE_URI_PREFIX``) and the
receiving servicer hands the certificate's node id to the core, which refuses a batch
claiming another node (``relay.core.peers``). The servicer only translates; what to
believe of a batch is decided in ``relay.core.peers.PeerInbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import grpc

from relay.common.convert import address_from_pb, address_to_pb, envelope_from_wire, fill_envelope
from relay.common.logs import outside_calls
from relay.common.status import abort
from relay.common.tls import channel_credentials, node_id_from_auth_context
from relay.config import ConfigError, TlsConfig
from relay.core.peers import PeerInbox
from relay.core.ports import Presence
from relay.errors import RelayError
from relay.metrics import RelayMetrics
from relay.model import Address, Notice, Offered, Pushed
from relaypb.node.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

MAX_BATCH = 512
MAX_BUFFER = 50_000
RETRY_SECONDS = (0.05, 0.2, 0.5, 1.0, 2.0)


class _Peer:
    """The outbound link to one peer node."""

    def __init__(self, node_id: str, links: GrpcNodeLinks) -> None:
        self.node_id = node_id
        self._links = links
        self._items: deque[node_pb2.Forward | node_pb2.Displace | node_pb2.Notice] = deque()
        self._ready = asyncio.Event()
        metrics = links.metrics
        # Bound once per peer: the loops below count without label lookups.
        self._dropped = metrics.link_dropped.labels(node_id)
        self._batches = metrics.link_batches.labels(node_id)
        self._forwards = metrics.link_forwards.labels(node_id)
        self._errors = metrics.link_errors.labels(node_id)
        # It outlives the call that made it: no request id of that call in its logs.
        self._task = asyncio.create_task(
            self._run(), name=f"link-{node_id}", context=outside_calls()
        )

    def put(self, item: node_pb2.Forward | node_pb2.Displace | node_pb2.Notice) -> None:
        if len(self._items) >= MAX_BUFFER:
            self._dropped.inc()
            return
        self._items.append(item)
        self._ready.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._ready.wait()
            try:
                await self._stream()
                failures = 0
            # InvalidStateError: a write after the peer ended the call (it stopped or
            # restarted); without it here this task would die and the link stay down.
            except (grpc.aio.AioRpcError, RelayError, OSError, asyncio.InvalidStateError) as exc:
                dropped = len(self._items)
                self._items.clear()
                self._errors.inc()
                self._dropped.inc(dropped)
                log.warning(
                    "link to %s failed (%s); %d wake-ups dropped", self.node_id, exc, dropped
                )
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                await asyncio.sleep(delay)  # reconnect backoff, not synchronisation

    async def _stream(self) -> None:
        target = await self._links.presence.node_address(self.node_id)
        if target is None:
            dropped = len(self._items)
            self._items.clear()
            self._ready.clear()
            self._dropped.inc(dropped)
            log.info("node %s is not alive; %d wake-ups dropped", self.node_id, dropped)
            return
        async with self._links.channel(target) as channel:
            call = node_pb2_grpc.NodeLinkStub(channel).Link()
            first = True
            while True:
                await self._ready.wait()
                batch = node_pb2.NodeBatch(from_node=self._links.node_id, repoll_all=first)
                size = 0
                while self._items and size < MAX_BATCH:
                    item = self._items.popleft()
                    size += 1
                    if isinstance(item, node_pb2.Forward):
                        batch.forwards.append(item)
                    elif isinstance(item, node_pb2.Notice):
                        batch.notices.append(item)
                    else:
                        batch.displaces.append(item)
                if not self._items:
                    self._ready.clear()
                await call.write(batch)
                self._batches.inc()
                self._forwards.inc(len(batch.forwards))
                first = False


class GrpcNodeLinks:
    """NodeLinks over gRPC streams (see ``relay.core.ports.NodeLinks``).

    With ``tls`` (its ``cert_file``/``key_file`` name this node's certificate), links
    are mutual TLS, peers verified with ``tls.ca_file``; the files are read again at
    every (re)connect, so a renewed certificate is used from the next link on.
    Without, links are plaintext (the peers' link listeners are then on loopback).
    """

    def __init__(
        self,
        node_id: str,
        presence: Presence,
        metrics: RelayMetrics,
        *,
        tls: TlsConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.presence = presence
        self.metrics = metrics
        self._tls = tls
        self._peers: dict[str, _Peer] = {}
        self._credentials = self._read_credentials() if tls is not None else None

    def _read_credentials(self) -> grpc.ChannelCredentials:
        assert self._tls is not None
        return channel_credentials(
            self._tls.ca_file, cert_file=self._tls.cert_file, key_file=self._tls.key_file
        )

    def channel(self, target: str) -> grpc.aio.Channel:
        """A channel to a peer's link listener at ``target`` (mutual TLS if configured)."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(target)
        try:
            self._credentials = self._read_credentials()
        except ConfigError as exc:  # e.g. a file half-written by a renewal: keep the last
            log.warning("link TLS files could not be read again (%s); using the last ones", exc)
        return grpc.aio.secure_channel(target, self._credentials)

    def _peer(self, node_id: str) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer(node_id, self)
        return peer

    def forward(self, node_id: str, items: Sequence[Pushed]) -> None:
        """Queue live envelopes for sessions on ``node_id``."""
        peer = self._peer(node_id)
        for item in items:
            forward = node_pb2.Forward(
                seq=item.seq, prev_seq=item.prev_seq, report_ack=item.report_ack
            )
            fill_envelope(forward.envelope, item.envelope)
            peer.put(forward)

    def offer(self, node_id: str, items: Sequence[Offered]) -> None:
        """Queue direct (unstored) envelopes for sessions on ``node_id``."""
        peer = self._peer(node_id)
        for item in items:
            forward = node_pb2.Forward(
                direct=True,
                epoch=item.epoch,
                prev_seq=item.after_seq,
                follows_message_id=item.follows,
            )
            fill_envelope(forward.envelope, item.envelope)
            peer.put(forward)

    def report(self, node_id: str, notices: Sequence[Notice]) -> None:
        """Queue notices for ``node_id`` about envelopes it forwarded here."""
        peer = self._peer(node_id)
        for n in notices:
            peer.put(
                node_pb2.Notice(
                    recipient=address_to_pb(n.recipient),
                    sender=address_to_pb(n.sender),
                    message_id=n.message_id,
                    acked=n.acked,
                    direct=n.direct,
                )
            )

    @property
    def remote(self) -> bool:
        """Links reach other nodes."""
        return True

    def displace(self, node_id: str, device: Address, epoch: int) -> None:
        """Tell ``node_id`` to end sessions of ``device`` older than ``epoch``."""
        self._peer(node_id).put(node_pb2.Displace(device=address_to_pb(device), epoch=epoch))

    async def close(self) -> None:
        """Stop every link."""
        for peer in self._peers.values():
            await peer.close()
        self._peers.clear()


class NodeLinkServicer(node_pb2_grpc.NodeLinkServicer):
    """Receives other nodes' batches and hands them to the core's PeerInbox.

    ``authenticated``: the listener is mutual TLS, so every call's peer certificate was
    verified; its node id (URI SAN) is what the core checks each batch's ``from_node``
    against. Without, a batch's ``from_node`` is all there is (plaintext, loopback only).
    """

    def __init__(self, peers: PeerInbox, *, authenticated: bool) -> None:
        self._peers = peers
        self._authenticated = authenticated

    async def Link(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.LinkSummary:
        """Apply each batch as it arrives: re-reads first, then forwards, then displaces.

        A batch the core refuses (another node than the certificate's) ends the call
        with its status (PERMISSION_DENIED); nothing of that batch is applied.
        """
        certified = None
        if self._authenticated:
            auth = {key: list(values) for key, values in context.auth_context().items()}
            certified = node_id_from_auth_context(auth)
        count = 0
        try:
            async for batch in request_iterator:
                peer = self._peers.admit(
                    batch.from_node, certified, authenticated=self._authenticated
                )
                if batch.repoll_all:
                    self._peers.repoll_all(peer)
                if batch.notices:
                    self._peers.notices(peer, [_notice(n) for n in batch.notices])
                if batch.forwards:
                    stored = [
                        Pushed(
                            envelope_from_wire(f.envelope),
                            f.seq,
                            f.prev_seq,
                            report_ack=f.report_ack,
                        )
                        for f in batch.forwards
                        if not f.direct
                    ]
                    if stored:
                        self._peers.accept(peer, stored)
                    direct = [
                        Offered(
                            envelope_from_wire(f.envelope),
                            f.epoch,
                            f.prev_seq,
                            f.follows_message_id,
                        )
                        for f in batch.forwards
                        if f.direct
                    ]
                    if direct:
                        self._peers.offer(peer, direct)
                for d in batch.displaces:
                    await self._peers.displace(peer, address_from_pb(d.device), d.epoch)
                count += 1
        except RelayError as exc:
            await abort(context, exc)
        return node_pb2.LinkSummary(batches=count)


def _notice(n: node_pb2.Notice) -> Notice:
    return Notice(
        address_from_pb(n.recipient), address_from_pb(n.sender), n.message_id, n.acked, n.direct
    )
