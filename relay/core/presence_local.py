"""Presence for a single process (the embedded default): nothing is ever remote."""

from __future__ import annotations

from collections.abc import Sequence

from relay.model import Address, Location, Notice, Offered, Pushed


class LocalPresence:
    """Presence when this node is the whole cluster."""

    def __init__(self) -> None:
        self._epochs: dict[Address, int] = {}
        self._entries: dict[Address, Location] = {}

    async def claim(
        self, device: Address, node_id: str, now_ms: int
    ) -> tuple[int, Location | None]:
        """A new epoch; there is never a previous location on another node."""
        epoch = max(self._epochs.get(device, 0) + 1, now_ms * 1000)
        self._epochs[device] = epoch
        self._entries[device] = Location(node_id, epoch)
        return epoch, None

    async def release(self, device: Address, node_id: str, epoch: int) -> None:
        """Forget the entry if it is still the one with ``epoch`` (the epoch counter stays)."""
        if self._entries.get(device) == Location(node_id, epoch):
            del self._entries[device]

    async def locate(self, devices: Sequence[Address]) -> dict[Address, Location]:
        """No device is on another node."""
        return {}

    async def current(self, device: Address) -> Location | None:
        """The entry of the device's newest session here, if it is open."""
        return self._entries.get(device)

    async def heartbeat(
        self, node_id: str, advertise: str, sessions: Sequence[tuple[Address, int]]
    ) -> bool:
        """Always intact."""
        return True

    async def node_address(self, node_id: str) -> str | None:
        """There are no other nodes."""
        return None


class NoLinks:
    """NodeLinks for a single process: there is no other node to talk to."""

    def forward(self, node_id: str, items: Sequence[Pushed]) -> None:
        """Never called with a remote node in a single process."""

    def displace(self, node_id: str, device: Address, epoch: int) -> None:
        """Never called with a remote node in a single process."""

    def offer(self, node_id: str, items: Sequence[Offered]) -> None:
        """Never called: ``remote`` is False."""

    def report(self, node_id: str, notices: Sequence[Notice]) -> None:
        """Never called with a remote node in a single process."""

    @property
    def remote(self) -> bool:
        """A single process has no other node."""
        return False
