"""Live routing: hand stored (or ephemeral) envelopes to the recipient's session.

Local sessions get them directly; sessions on other nodes through batched node links,
found through presence. Routing is best effort by design: every routed envelope that is
not ephemeral is already durable, so a failure here only delays it until the recipient's
session re-reads its queue.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from relay.core.ports import NodeLinks, Presence
from relay.core.sessions import Session, SessionRegistry
from relay.errors import RelayError
from relay.model import Address, Location, Pushed

log = logging.getLogger(__name__)


class Router:
    """Routes live envelopes to the sessions of their recipients, wherever they are."""

    def __init__(
        self, node_id: str, registry: SessionRegistry, presence: Presence, links: NodeLinks
    ) -> None:
        self._node_id = node_id
        self._registry = registry
        self._presence = presence
        self._links = links

    async def route(self, items: Sequence[Pushed]) -> set[Address]:
        """Push ``items`` to their recipients' sessions; return the recipients found online."""
        local: dict[Session, list[Pushed]] = defaultdict(list)
        remote: list[Pushed] = []
        for item in items:
            session = self._registry.get(item.envelope.recipient)
            if session is not None:
                local[session].append(item)
            else:
                remote.append(item)
        for session, group in local.items():
            session.push(group)
        online = {s.address for s in local}
        if not remote:
            return online
        locations = await self.locate({i.envelope.recipient for i in remote})
        by_node: dict[str, list[Pushed]] = defaultdict(list)
        for item in remote:
            where = locations.get(item.envelope.recipient)
            if where is not None and where.node_id != self._node_id:
                by_node[where.node_id].append(item)
                online.add(item.envelope.recipient)
        for node_id, group in by_node.items():
            self._links.forward(node_id, group)
        return online

    async def locate(self, devices: set[Address]) -> dict[Address, Location]:
        """Where ``devices`` are online (presence, maybe cached); {} if presence is down."""
        try:
            return await self._presence.locate(sorted(devices))
        except RelayError as exc:
            log.warning("presence lookup failed, envelopes wait in the store: %s", exc)
            return {}

    def accept(self, items: Sequence[Pushed]) -> list[Pushed]:
        """Envelopes forwarded by another node for sessions here; return those taken."""
        by_session: dict[Session, list[Pushed]] = defaultdict(list)
        taken: list[Pushed] = []
        for item in items:
            session = self._registry.get(item.envelope.recipient)
            if session is not None:
                by_session[session].append(item)
                taken.append(item)
        for session, group in by_session.items():
            session.push(group)
        return taken

    def displace(self, device: Address, epoch: int) -> bool:
        """End ``device``'s session here if it is older than ``epoch``; return whether it was.

        The caller has established that a session of ``epoch`` exists (the claim made
        here, or presence for a peer's word: see ``relay.core.peers``).
        """
        session = self._registry.get(device)
        if session is None or session.epoch >= epoch:
            return False
        session.displace(epoch)
        self._registry.detach(session)
        return True

    def reread_all(self) -> None:
        """Every session here re-reads its queue (wake-ups may have been lost)."""
        for session in self._registry.all():
            session.reread()
