"""RelayClient: one device session on the relay, with reconnects, retries and dedup.

Delivery guarantees (see DESIGN.md section 3):

* Sends are idempotent by ``message_id``. A send whose SendResults frame has not arrived
  when the stream breaks is written again, with the same id and sealed bytes, on the
  next session; the relay answers DUPLICATE if it had it already.
* Received envelopes are opened by the codec and committed (fsync'd) to the local inbox
  of the state file *before* the SDK acks them to the relay, so the relay drops its copy
  only once the device holds one. Ids already received are acked and dropped, so the
  application sees each (sender, message_id) once.
* The application acknowledges a message by asking :meth:`RelayClient.messages` for
  the next one, or with :meth:`RelayClient.ack`; only then is it removed from the local
  inbox. A message not acknowledged (crash, or the loop left early) is yielded again by
  the next ``messages()`` call, also after a restart: redelivery, never loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import NoReturn

import grpc

from relay.errors import Draining, RelayError, SessionDisplaced, Unavailable
from relay.model import Address
from relay.sdk.backoff import Backoff, ExponentialBackoff
from relay.sdk.channels import endpoint, open_channel
from relay.sdk.codec import Codec, PlaintextCodec
from relay.sdk.crypto.errors import AwaitingTrust, CryptoError
from relay.sdk.directory import from_pb
from relay.sdk.keys import Identity
from relay.sdk.outbox import BatchResult, Outbox, OutgoingMessage, SendReceipt, sealed_envelope
from relay.sdk.session import Session
from relay.sdk.state import DeviceState, ReceivedMessage
from relay.sdk.status import Endpoint, from_rpc_error, is_retryable
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
INBOX_PAGE = 64
#: A relay node that said NODE_DRAINING is skipped this long by reconnects (while the
#: client has another target to try).
DRAINING_SKIP_SECONDS = 30.0


class RelayClient:
    """A session of the device held in ``state`` (which must be registered).

    ``target`` is ``host:port`` (the client makes and closes its channel), a list of
    them (relay nodes of one cluster: each reconnect after a failure tries the next),
    or a ``grpc.aio.Channel`` owned by the caller. The channels it makes use TLS as
    :mod:`relay.sdk.channels` says: verified with the CA in ``tls_ca`` (PEM; empty: the
    system's trusted CAs), plaintext only to loopback without a ``tls_ca`` unless
    ``tls`` forces it either way. ``receive=False`` opens a send-only
    session that displaces nobody. ``backoff`` paces reconnects (and may give up).
    Use as ``async with RelayClient(...) as client``: entering waits for the first
    Ready; failures surface as relay.errors exceptions (``Unauthenticated``,
    ``SessionDisplaced``, ``DeviceRemoved`` (final, like a displacement: never
    reconnected), and ``Unavailable`` once ``backoff`` gives up).

    A displacement is final only when the relay says a newer receiving session of this
    device took over: its SESSION_DISPLACED names that session's epoch, above the one
    this session got in Ready. Any other displacement (no epoch, not a newer one) is
    reconnected with backoff like a lost connection.

    A node that is shutting down ends its sessions with NODE_DRAINING
    (:class:`relay.errors.Draining`): the client reconnects to its next target at once,
    without backoff, and skips the draining one for DRAINING_SKIP_SECONDS. With no
    other target to try it reconnects with backoff as after any other loss.
    """

    def __init__(
        self,
        state: DeviceState,
        target: str | Sequence[str] | grpc.aio.Channel,
        *,
        receive: bool = True,
        codec: Codec | None = None,
        backoff: Backoff | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        tls_ca: str = "",
        tls: bool | None = None,
    ) -> None:
        identity, address = state.identity(), state.address()
        if identity is None or address is None:
            raise RuntimeError(f"{state.path} holds no registered device")
        self.address: Address = address
        self.receive = receive
        self._identity: Identity = identity
        self._state = state
        targets = [target] if isinstance(target, str) else target
        if isinstance(targets, grpc.aio.Channel):
            self._own_channel = False
            self._channels = [(targets, "relay")]
        else:
            if not targets:
                raise ValueError("RelayClient needs at least one relay target")
            self._own_channel = True
            self._channels = [(open_channel(t, tls_ca=tls_ca, tls=tls), t) for t in targets]
        self._tls_ca, self._tls = tls_ca, tls
        self._current = 0
        #: Target index -> loop time until which it is skipped (it said NODE_DRAINING).
        self._skip_until: dict[int, float] = {}
        self._channel, self._target = self._channels[0]
        self._stub = relay_pb2_grpc.RelayStub(self._channel)
        self._codec: Codec = codec or PlaintextCodec()
        self._backoff: Backoff = backoff or ExponentialBackoff()
        self._batch_size = batch_size
        self._handshake_timeout = handshake_timeout
        self._outbox = Outbox()
        self._session: Session | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._queue_empty = asyncio.Event()
        self._inbox_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Ready frame of the current (or last) session.
        self.node_id = ""
        self.session_epoch = 0
        #: Envelopes the relay delivered again after this device had them (acked, dropped).
        self.duplicates_dropped = 0
        #: Envelopes the codec could not open (tampered, replayed, no session): dropped.
        self.undecryptable = 0
        #: Messages kept unopened and unacknowledged until a changed account key is trusted.
        self.held_for_trust = 0

    async def __aenter__(self) -> RelayClient:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start connecting in the background (``async with`` does this)."""
        if self._task is None:
            await asyncio.to_thread(self._state.prune)
            self._task = asyncio.create_task(self._run(), name=f"relay-session {self.address}")
            self._task.add_done_callback(self._on_run_done)

    async def close(self) -> None:
        """End the session; sends still waiting fail with RuntimeError."""
        if self._error is None:
            self._fail(RuntimeError("RelayClient is closed"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_channel:
            for channel, _ in self._channels:
                await channel.close()

    @property
    def error(self) -> BaseException | None:
        """Why the client stopped (None while it is running or reconnecting)."""
        return self._error

    async def wait_ready(self) -> None:
        """Wait until a session is authenticated (returns at once if one is)."""
        await self._wait(self._ready)

    async def wait_queue_empty(self) -> None:
        """Wait for the QueueEmpty marker of the current session.

        While reconnecting, that is the marker of the next session. Once it returns,
        every message stored for this device before the session began is in the local
        inbox (and so will be yielded by :meth:`messages`).
        """
        self._require_receive()
        await self._wait(self._queue_empty)

    # -- sending ------------------------------------------------------------------------

    async def send(
        self,
        recipient: Address,
        content: bytes,
        *,
        message_id: bytes | None = None,
        ephemeral: bool = False,
        ttl_seconds: int = 0,
    ) -> SendReceipt:
        """Send one message; return once the relay accepted it (retried across reconnects).

        Raises the relay.errors exception of a REJECTED outcome (e.g. LimitExceeded with
        ``limit`` naming the configuration key).
        """
        message = OutgoingMessage(recipient, content, message_id, ephemeral, ttl_seconds)
        [receipt] = await self.send_many([message])
        return receipt.raise_for_error()

    async def send_many(self, messages: Iterable[OutgoingMessage]) -> list[SendReceipt]:
        """Send messages in SendBatch frames of up to ``batch_size``, in order.

        Returns one receipt per message once all were answered; a rejected message has
        ``receipt.error`` set (nothing is raised for it). Cancelling stops the retries.
        """
        self._check_running()
        envelopes = [sealed_envelope(m, self._codec) for m in messages]
        batches = [
            envelopes[i : i + self._batch_size] for i in range(0, len(envelopes), self._batch_size)
        ]
        results = await self._submit([(batch, ()) for batch in batches])
        return [receipt for result in results for receipt in result.receipts]

    async def send_batch(
        self,
        envelopes: Sequence[relay_pb2.Envelope],
        complete_for: Sequence[tuple[str, str]] = (),
    ) -> BatchResult:
        """Send already sealed envelopes as one SendBatch (retried across reconnects).

        ``complete_for`` lists the (tenant, user)s whose every device (but this one) the
        batch addresses, each envelope carrying ``recipient_registration_id``: the relay
        refuses the envelopes to a user whose device list does not match, and says why
        in ``BatchResult.mismatches`` (Sesame; see relay.sdk.secure).
        """
        self._check_running()
        [result] = await self._submit([(envelopes, complete_for)])
        return result

    async def _submit(
        self,
        batches: Sequence[tuple[Sequence[relay_pb2.Envelope], Sequence[tuple[str, str]]]],
    ) -> list[BatchResult]:
        submitted = [self._outbox.submit(envs, users) for envs, users in batches]
        session = self._session
        if session is not None and session.ready is not None:
            await self._flush(session)
        try:
            return await asyncio.gather(*(future for _, future in submitted))
        except BaseException:
            for batch_id, _ in submitted:
                self._outbox.discard(batch_id)
            raise

    async def _flush(self, session: Session) -> None:
        """Write every pending batch not yet written on ``session``, oldest first."""
        try:
            async with session.lock:
                for frame in self._outbox.take_unwritten(session):
                    await session.write_locked(frame)
        except grpc.aio.AioRpcError as exc:
            log.debug("send interrupted, will resend on the next session: %s", type(exc).__name__)

    # -- receiving ----------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[ReceivedMessage]:
        """Yield received messages, in arrival order, each (sender, message_id) once.

        The previous message is acknowledged when the loop asks for the next one; call
        :meth:`ack` for the last one before leaving the loop. Unacknowledged messages are
        yielded again by the next call (also after a restart). One consumer at a time.
        Raises the client's error once the local inbox is drained after a failure.
        """
        self._require_receive()
        cursor = 0
        while True:
            self._inbox_changed.clear()
            entries = await asyncio.to_thread(self._state.inbox, cursor, INBOX_PAGE)
            if not entries:
                await self._wait(self._inbox_changed)
                continue
            for entry in entries:
                cursor = entry.seq
                yield entry.message
                await self.ack(entry.message)

    async def ack(self, *messages: ReceivedMessage) -> None:
        """Acknowledge messages: they are removed from the local inbox (idempotent)."""
        await asyncio.to_thread(self._state.remove_from_inbox, messages)

    def _store(self, envelopes: Sequence[relay_pb2.Envelope]) -> tuple[int, int, set[bytes]]:
        """Open the new envelopes and commit them to the inbox (runs off the loop).

        The codec's state changes and the inbox commit in one transaction: a crash
        loses neither a message nor a key. Returns (new messages, undecryptable, the ids
        of messages held unopened: they must not be acknowledged, see AwaitingTrust).
        """
        with self._state.transaction():
            fresh: dict[tuple[Address, bytes], ReceivedMessage] = {}
            for e in envelopes:
                message = ReceivedMessage(
                    from_pb(e.sender), e.message_id, e.content, e.server_timestamp_ms
                )
                key = (message.sender, message.message_id)
                if key not in fresh and not self._state.was_received(*key):
                    fresh[key] = message
            opened, failed, held = [], 0, set()
            for m in fresh.values():
                try:
                    opened.append(replace(m, content=self._codec.open(m.sender, m.content)))
                except AwaitingTrust as exc:
                    held.add(m.message_id)
                    log.warning("kept message %s: %s", m.message_id.hex(), exc.message)
                except CryptoError as exc:
                    failed += 1
                    log.warning(
                        "dropped message %s from %s: %s", m.message_id.hex(), m.sender, exc.message
                    )
            return self._state.accept(opened), failed, held

    async def _deliver(self, session: Session, deliver: relay_pb2.Deliver) -> None:
        await self._codec.prepare([(from_pb(e.sender), e.content) for e in deliver.envelopes])
        new, failed, held = await asyncio.to_thread(self._store, deliver.envelopes)
        self.undecryptable += failed
        self.held_for_trust += len(held)
        self.duplicates_dropped += len(deliver.envelopes) - new - failed - len(held)
        if new:
            self._inbox_changed.set()
        ids = [e.message_id for e in deliver.envelopes if e.message_id not in held]
        await session.write(relay_pb2.ClientFrame(ack=relay_pb2.AckBatch(message_ids=ids)))

    # -- the session loop ---------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            session = Session(self._stub)
            fatal: BaseException | None = None
            try:
                await self._serve(session)
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, target=self._endpoint())
                own = session.ready.session_epoch if session.ready is not None else None
                if not is_retryable(exc, session_epoch=own):
                    fatal = error
                elif isinstance(error, SessionDisplaced):
                    log.warning(
                        "relay %s ended session %s as displaced without naming a newer one "
                        "(%s); reconnecting",
                        self._target,
                        own,
                        error.metadata.get("session_epoch", "no epoch"),
                    )
            except TimeoutError:
                error = Unavailable(f"relay {self._target} did not complete the handshake")
            except Unavailable as exc:  # the stream ended without an error status
                error = exc
            except Exception as exc:  # protocol error, codec or state file failure
                fatal = exc
            finally:
                self._session = None
                self._ready.clear()
                self._queue_empty.clear()
                session.cancel()
            if fatal is not None:
                self._fail(fatal)
                return
            failures = 1 if session.ready is not None else failures + 1
            draining = isinstance(error, Draining)
            if draining:
                now = asyncio.get_running_loop().time()
                self._skip_until[self._current] = now + DRAINING_SKIP_SECONDS
            drained_from = self._target
            if self._next_target() and draining:
                log.info("relay %s is draining; reconnecting to %s now", drained_from, self._target)
                continue
            log.info("relay session lost (%s); reconnect attempt %d", error.message, failures)
            if not await self._backoff(failures):
                self._fail(error)
                return

    def _endpoint(self) -> Endpoint:
        """The current relay node, as error messages name it."""
        if not self._own_channel:
            return Endpoint("relay")
        return endpoint("relay", self._target, tls_ca=self._tls_ca, tls=self._tls)

    def _next_target(self) -> bool:
        """Move to the next relay node of the list (any node serves any device).

        Nodes that said NODE_DRAINING lately are passed over. Returns False if every
        other node is such a one (then it moves to the next in order all the same).
        """
        now = asyncio.get_running_loop().time()
        count = len(self._channels)
        order = [(self._current + k) % count for k in range(1, count + 1)]
        usable = [i for i in order if i != self._current and self._skip_until.get(i, 0.0) <= now]
        self._current = usable[0] if usable else order[0]
        self._channel, self._target = self._channels[self._current]
        self._stub = relay_pb2_grpc.RelayStub(self._channel)
        return bool(usable)

    async def _serve(self, session: Session) -> NoReturn:
        async with asyncio.timeout(self._handshake_timeout):
            ready = await session.authenticate(self._identity, self.address, receive=self.receive)
        self.node_id, self.session_epoch = ready.node_id, ready.session_epoch
        self._session = session
        self._ready.set()
        flush = asyncio.create_task(self._flush(session))
        try:
            while True:
                frame = await session.read()
                kind = frame.WhichOneof("frame")
                if kind == "deliver":
                    await self._deliver(session, frame.deliver)
                elif kind == "queue_empty":
                    self._queue_empty.set()
                elif kind == "send_results":
                    self._outbox.resolve(frame.send_results)
                else:
                    raise RelayError(f"relay sent an unexpected {kind} frame")
        finally:
            flush.cancel()

    def _on_run_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # e.g. a backoff that raised
            self._fail(task.exception() or RuntimeError("session loop failed"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._outbox.fail_all(error)
        for event in (self._ready, self._queue_empty, self._inbox_changed):
            event.set()

    async def _wait(self, event: asyncio.Event) -> None:
        if self._error is not None:
            raise self._error
        await event.wait()
        if self._error is not None:
            raise self._error

    def _check_running(self) -> None:
        if self._error is not None:
            raise self._error
        if self._task is None:
            raise RuntimeError("RelayClient is not started: use `async with`")

    def _require_receive(self) -> None:
        if not self.receive:
            raise RuntimeError("this is a send-only session (receive=False)")
