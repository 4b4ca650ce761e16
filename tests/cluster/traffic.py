"""Traffic between SDK devices across relay nodes, with exactly-once and FIFO checks."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.model import Address, Outcome
from relay.sdk import DeviceState, OutgoingMessage, RelayClient
from relay.sdk.backoff import ExponentialBackoff
from tests.sdk.helpers import provision

ACKED = (Outcome.STORED, Outcome.DUPLICATE, Outcome.DELIVERED)


@dataclass
class Traffic:
    """``devices`` SDK devices spread over ``targets`` (a list of relay nodes each)."""

    keys_address: str
    home: Path
    targets: Callable[[int], Sequence[str]]
    devices: int = 50
    seed: int = 7
    addresses: list[Address] = field(default_factory=list)
    clients: list[RelayClient] = field(default_factory=list)
    states: list[DeviceState] = field(default_factory=list)
    #: message ids the relay acknowledged, per (sender, recipient), in send order
    acked: dict[tuple[Address, Address], list[bytes]] = field(
        default_factory=lambda: defaultdict(list)
    )
    #: (sender, content) received, per recipient, in order
    received: dict[Address, list[tuple[Address, bytes, bytes]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    outcomes: dict[bytes, Outcome] = field(default_factory=dict)
    #: Where each message was when it was answered and when it was received (diagnostics).
    answered_on: dict[bytes, str] = field(default_factory=dict)
    received_on: dict[bytes, str] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        for i in range(self.devices):
            home = self.home / f"d{i}"
            self.addresses.append(await provision(self.keys_address, home, f"user{i}"))
            state = DeviceState.open(home)
            self.states.append(state)
            client = RelayClient(
                state,
                list(self.targets(i)),
                backoff=ExponentialBackoff(base=0.05, cap=0.5),
            )
            await client.__aenter__()
            self.clients.append(client)
            self._readers.append(asyncio.create_task(self._read(i)))

    async def _read(self, i: int) -> None:
        me = self.addresses[i]
        async for message in self.clients[i].messages():
            self.received[me].append((message.sender, message.message_id, message.content))
            client = self.clients[i]
            self.received_on[message.message_id] = f"{client.node_id}/{client.session_epoch}"
            self._changed.set()

    async def send(
        self,
        total: int,
        *,
        batch: int = 10,
        pause: asyncio.Event | None = None,
        on_acked: Callable[[int], None] | None = None,
    ) -> None:
        """Send ``total`` messages between random pairs; each device sends its share."""
        rng = random.Random(self.seed)
        plan: dict[int, list[int]] = defaultdict(list)
        for _ in range(total):
            src = rng.randrange(self.devices)
            dst = rng.choice([d for d in range(self.devices) if d != src])
            plan[src].append(dst)
        counter: dict[tuple[int, int], int] = defaultdict(int)
        done = 0

        async def sender(src: int) -> None:
            nonlocal done
            dsts = plan[src]
            for start in range(0, len(dsts), batch):
                chunk = []
                for dst in dsts[start : start + batch]:
                    n = counter[src, dst]
                    counter[src, dst] += 1
                    chunk.append(OutgoingMessage(self.addresses[dst], b"%d" % n))
                receipts = await self.clients[src].send_many(chunk)
                for r in receipts:
                    assert r.outcome in ACKED, r
                    self.acked[self.addresses[src], r.recipient].append(r.message_id)
                    self.outcomes[r.message_id] = r.outcome
                    client = self.clients[src]
                    self.answered_on[r.message_id] = f"{client.node_id}/{client.session_epoch}"
                done += len(receipts)
                if on_acked is not None:
                    on_acked(done)

        await asyncio.gather(*(sender(s) for s in plan))

    def missing_ids(self) -> list[tuple[Address, Address, bytes]]:
        got = {(r, mid) for r, msgs in self.received.items() for (_, mid, _) in msgs}
        return [
            (src, dst, mid)
            for (src, dst), ids in self.acked.items()
            for mid in ids
            if (dst, mid) not in got
        ]

    def missing(self) -> int:
        return len(self.missing_ids())

    def explain(self) -> str:
        """Where each missing message went (for a failure message)."""
        lines = []
        for src, dst, mid in self.missing_ids()[:10]:
            i, j = self.addresses.index(src), self.addresses.index(dst)
            lines.append(
                f"{src} (node {self.clients[i].node_id}) -> {dst} (node "
                f"{self.clients[j].node_id}, epoch {self.clients[j].session_epoch}): "
                f"id {mid.hex()[:8]} outcome {self.outcomes.get(mid)}, recipient SDK "
                f"received={self.states[j].was_received(src, mid)}"
            )
        return "\n".join(lines)

    async def wait_delivered(self, timeout: float) -> None:
        """Wait until every acknowledged message has been received (or time out)."""
        try:
            async with asyncio.timeout(timeout):
                while self.missing():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            received = sum(len(m) for m in self.received.values())
            raise AssertionError(
                f"{self.missing()} acknowledged messages not delivered after {timeout} s "
                f"({received} received):\n{self.explain()}"
            ) from None

    def check(self) -> int:
        """Assert exactly-once and FIFO per pair; return the number of messages checked."""
        count = 0
        for dst, msgs in self.received.items():
            ids = [mid for (_, mid, _) in msgs]
            assert len(ids) == len(set(ids)), f"{dst} got a message twice"
            by_sender: dict[Address, list[int]] = defaultdict(list)
            ids_of: dict[Address, list[bytes]] = defaultdict(list)
            for sender, mid, content in msgs:
                by_sender[sender].append(int(content))
                ids_of[sender].append(mid)
            for sender, seq in by_sender.items():
                assert seq == sorted(seq), (
                    f"{sender} -> {dst} out of order: {seq[:20]}\n"
                    f"{self._explain_order(sender, dst, seq, ids_of[sender])}"
                )
                assert len(seq) == len(set(seq)), f"{sender} -> {dst} duplicated"
            count += len(ids)
        assert self.missing() == 0
        return count

    def _explain_order(self, src: Address, dst: Address, seq: list[int], ids: list[bytes]) -> str:
        """The outcomes and nodes of an out-of-order pair's messages (a failure message)."""
        i, j = self.addresses.index(src), self.addresses.index(dst)
        lines = [
            f"sender on node {self.clients[i].node_id}, recipient on node "
            f"{self.clients[j].node_id} (epoch {self.clients[j].session_epoch})"
        ]
        for n, mid in zip(seq, ids, strict=True):
            lines.append(
                f"  #{n} id {mid.hex()[:8]} answered {self.outcomes.get(mid)} "
                f"(sender on {self.answered_on.get(mid)}), received on "
                f"{self.received_on.get(mid)}"
            )
        return "\n".join(lines[:30])

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for client in self.clients:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(client.close(), 10)
        for state in self.states:
            state.close()
