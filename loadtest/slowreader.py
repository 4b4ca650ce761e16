"""A receiver that stops reading, and how much the relay grows meanwhile.

The scenario behind ``rss_mb_slow_reader`` (``make bench``, phase ``slowreader``) and
``tests/test_slow_reader.py``: alice and bob are registered; bob's receiving stream is
authenticated and then never read again (HTTP/2 flow control fills up), while bob keeps
acking the ids he knows of (he is told them out of band, as a device that got them on
another path would be). Alice pushes ``COUNT`` envelopes of ``ENVELOPE`` bytes at him,
``BATCH`` per SendBatch, each batch answered before the next leaves. The figure is the
relay process's peak resident memory during the push minus its resident memory before.

The relay runs with ``LIMITS``: a 4 MiB in-flight budget per session, a stall timeout
long enough that the stream is not ended during the push, a queue bound the push cannot
reach. What it may grow by: the session's two budgets (direct, pushed), a Deliver frame
stuck in the transport, SQLite's page cache and allocator slack (``RSS_BOUND_MB``).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from loadtest.devices import Identity, handshake, open_call, register_all
from loadtest.wire import ack_frame
from relay.common.convert import address_to_pb
from relay.model import Address
from relaypb.relay.v1 import relay_pb2

ENVELOPE = 200 * 1024
COUNT = 400
BATCH = 10
INFLIGHT_BYTES = 4 * 1024 * 1024
#: The relay's ``[limits]`` for the scenario.
LIMITS: dict[str, int] = {
    "max_session_inflight_bytes": INFLIGHT_BYTES,
    "write_stall_seconds": 600,
    "max_queue_bytes": 1024 * 1024 * 1024,
}
#: RSS growth allowed while 80 MiB go to a device that reads nothing: the session's two
#: 4 MiB budgets (direct, pushed), a Deliver frame stuck in the transport, SQLite's page
#: cache and allocator slack. The test's bound; the bench reports the figure beside it.
RSS_BOUND_MB = 48
#: Seconds alice waits for the answers to one SendBatch.
ANSWER_TIMEOUT_S = 30.0
TENANT = "default"
ACCEPTED = frozenset({relay_pb2.OUTCOME_DELIVERED, relay_pb2.OUTCOME_STORED})


class SlowReaderError(RuntimeError):
    """The scenario could not be carried out (a stream ended, a frame was unexpected)."""


def limits_toml(limits: dict[str, Any] | None = None) -> str:
    """A relay TOML file's ``[limits]`` section with ``limits`` (default ``LIMITS``)."""
    chosen = LIMITS if limits is None else limits
    return "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in chosen.items())


def _status_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise SlowReaderError(f"/proc/{pid}/status has no {name}")


class PeakRss:
    """Peak resident memory of process ``pid`` from now on, in MiB (``/proc``, Linux).

    Writing ``5`` to ``/proc/PID/clear_refs`` resets the process's high-water mark
    (VmHWM) to its current RSS (Linux 4.0 and later; allowed for one's own children and
    root), so VmHWM at the end is the true peak since then, between samples too. Where
    that write is refused, the peak is the highest VmRSS sampled (``sample()``), which
    can miss a short spike; ``source`` says which.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_reset = self._reset_hwm()
        self.base_mib = _status_kb(pid, "VmRSS") / 1024
        self._sampled = self.base_mib

    def _reset_hwm(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    @property
    def source(self) -> str:
        """Where the peak comes from: ``VmHWM`` or ``VmRSS samples``."""
        return "VmHWM" if self.hwm_reset else "VmRSS samples"

    def sample(self) -> float:
        """Read VmRSS now (MiB) and remember the highest."""
        rss = _status_kb(self.pid, "VmRSS") / 1024
        self._sampled = max(self._sampled, rss)
        return rss

    def peak_mib(self) -> float:
        """The highest resident memory since the start (MiB)."""
        self.sample()
        if not self.hwm_reset:
            return self._sampled
        return max(self._sampled, _status_kb(self.pid, "VmHWM") / 1024)


@dataclass
class UnreadSession:
    """A receiving Connect stream that is never read after its QueueEmpty marker."""

    call: Any
    ready: relay_pb2.Ready

    async def ack(self, *ids: bytes) -> None:
        """Acknowledge ``ids`` (written on the stream; nothing is read)."""
        await self.call.write(ack_frame(ids))

    async def close(self) -> None:
        """Cancel the call."""
        self.call.cancel()


@dataclass
class SenderSession:
    """A Connect stream that sends SendBatch frames and reads their SendResults."""

    call: Any
    _waiting: dict[int, asyncio.Future[list[int]]] = field(default_factory=dict)
    _batch: int = 0
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading the stream (SendResults; other frames are skipped)."""
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        ended = "EOF"
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                if frame.WhichOneof("frame") == "send_results":
                    fut = self._waiting.pop(frame.send_results.batch_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result([r.outcome for r in frame.send_results.results])
        except grpc.aio.AioRpcError as exc:
            ended = f"{exc.code().name} {exc.details()}"
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(SlowReaderError(f"the sender's stream ended: {ended}"))

    async def send(self, envelopes: list[relay_pb2.Envelope]) -> list[int]:
        """One SendBatch; the outcome of each envelope, in order."""
        self._batch += 1
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting[self._batch] = fut
        frame = relay_pb2.ClientFrame(
            send=relay_pb2.SendBatch(batch_id=self._batch, envelopes=envelopes)
        )
        await self.call.write(frame.SerializeToString())
        return await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)

    async def close(self) -> None:
        """Cancel the call and its reader."""
        self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def identity(address: Address, key: Ed25519PrivateKey) -> Identity:
    """A registered device (address and signing key) as the load generator's Identity."""
    return Identity(0, address.tenant, address.user, key, address.device)


async def connect_unread(channel: grpc.aio.Channel, device: Identity) -> UnreadSession:
    """A receiving session authenticated, then never read again (not even its status)."""
    call = open_call(channel)
    ready = await handshake(call, device, receive=True)
    marker = await call.read()
    if marker is grpc.aio.EOF or marker.WhichOneof("frame") != "queue_empty":
        raise SlowReaderError(f"expected queue_empty after ready, got {marker!r}")
    return UnreadSession(call, ready)


async def connect_sender(channel: grpc.aio.Channel, device: Identity) -> SenderSession:
    """An authenticated session whose SendResults are read (it receives too, as the SDK)."""
    call = open_call(channel)
    await handshake(call, device, receive=True)
    session = SenderSession(call)
    session.start()
    return session


def envelope(recipient: Address, size: int = ENVELOPE) -> relay_pb2.Envelope:
    """An envelope of ``size`` random bytes with a random 16-byte id."""
    return relay_pb2.Envelope(
        message_id=os.urandom(16), recipient=address_to_pb(recipient), content=os.urandom(size)
    )


async def push(
    alice: SenderSession, bob: UnreadSession, to: Address, n: int, size: int = ENVELOPE
) -> list[int]:
    """One batch from alice; bob acks its ids while alice waits for her answers."""
    envs = [envelope(to, size) for _ in range(n)]
    sending = asyncio.ensure_future(alice.send(envs))
    await bob.ack(*(e.message_id for e in envs))
    return await sending


@dataclass(frozen=True, slots=True)
class Growth:
    """What the push did to the relay's memory, and the answers alice got."""

    base_mib: float
    peak_mib: float
    source: str
    outcomes: list[int]
    seconds: float

    @property
    def growth_mib(self) -> float:
        """Peak minus base (MiB): ``rss_mb_slow_reader``."""
        return self.peak_mib - self.base_mib

    def count(self, outcome: int) -> int:
        """How many envelopes were answered ``outcome``."""
        return self.outcomes.count(outcome)

    def as_dict(self) -> dict[str, Any]:
        """The figures for a JSON report."""
        return {
            "rss_mb_slow_reader": round(self.growth_mib, 1),
            "base_mib": round(self.base_mib, 1),
            "peak_mib": round(self.peak_mib, 1),
            "peak_source": self.source,
            "delivered": self.count(relay_pb2.OUTCOME_DELIVERED),
            "stored": self.count(relay_pb2.OUTCOME_STORED),
            "other_outcomes": sum(1 for o in self.outcomes if o not in ACCEPTED),
            "seconds": round(self.seconds, 1),
        }


async def register_pair(keys_target: str) -> tuple[Identity, Identity]:
    """Alice and bob, each a new account of one device."""
    async with grpc.aio.insecure_channel(keys_target) as channel:
        a, b = await register_all(channel, TENANT, [(0, "alice"), (1, "bob")], concurrency=2)
    return a, b


async def measure(
    relay_target: str,
    keys_target: str,
    pid: int,
    *,
    count: int = COUNT,
    batch: int = BATCH,
    size: int = ENVELOPE,
) -> Growth:
    """Run the scenario against the relay at ``relay_target`` (process ``pid``).

    One warm-up envelope first (the first envelope of a stream is stored), then the
    base reading, then ``count // batch`` batches with a reading after each.
    """
    alice, bob = await register_pair(keys_target)
    async with (
        grpc.aio.insecure_channel(relay_target) as ch_a,
        grpc.aio.insecure_channel(relay_target) as ch_b,
    ):
        b = await connect_unread(ch_b, bob)
        a = await connect_sender(ch_a, alice)
        try:
            await push(a, b, bob.address, 1, size)
            meter = PeakRss(pid)
            started = time.monotonic()
            outcomes: list[int] = []
            for _ in range(count // batch):
                outcomes += await push(a, b, bob.address, batch, size)
                meter.sample()
            return Growth(
                meter.base_mib, meter.peak_mib(), meter.source, outcomes, time.monotonic() - started
            )
        finally:
            await a.close()
            await b.close()
