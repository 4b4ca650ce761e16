"""The Relay gRPC servicer: translates frames to core calls and core events to frames."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc

from relay.common.convert import (
    OUTCOME_TO_PB,
    address_from_pb,
    cached_address_pb,
    envelope_from_pb,
    fill_envelope,
)
from relay.common.status import abort, unary
from relay.common.tls import BEARER_NEEDS_TLS, call_is_protected
from relay.core.auth import ApiKeys, DeviceAuthenticator
from relay.core.delivery import Relay, SendOutcome
from relay.core.sendorder import Turn
from relay.core.sessions import Deliver, QueueEmpty, Session
from relay.errors import InvalidArgument, RelayError, Status, Unauthenticated, WriteStalled
from relay.metrics import RelayMetrics
from relay.model import Address, DeviceListMismatch
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[relay_pb2.ClientFrame, relay_pb2.ServerFrame]


def mismatches_to_pb(
    mismatches: Sequence[DeviceListMismatch],
) -> list[relay_pb2.DeviceListMismatch]:
    """DeviceListMismatch messages for core mismatches."""
    return [
        relay_pb2.DeviceListMismatch(
            user=relay_pb2.UserRef(tenant=m.tenant, user=m.user),
            missing_devices=m.missing,
            extra_devices=m.extra,
            stale_devices=m.stale,
        )
        for m in mismatches
    ]


def add_results(results: Any, outcomes: Sequence[SendOutcome]) -> None:
    """Append SendResult messages for core outcomes to the repeated field ``results``."""
    add = results.add
    for o in outcomes:
        r = add(message_id=o.message_id, outcome=OUTCOME_TO_PB[o.outcome])
        r.recipient.CopyFrom(cached_address_pb(o.recipient))
        err = o.error
        if err is not None:
            r.code = int(err.status)
            r.message = err.message
            r.limit = err.metadata.get("limit", "")


class RelayServicer(relay_pb2_grpc.RelayServicer):
    """relaypb.relay.v1.Relay on top of the relay core."""

    def __init__(
        self,
        *,
        relay: Relay,
        authenticator: DeviceAuthenticator,
        api_keys: ApiKeys,
        metrics: RelayMetrics,
        node_id: str,
        auth_timeout_seconds: float,
        max_inflight_batches: int = 32,
        write_stall_seconds: float = 30.0,
    ) -> None:
        self._relay = relay
        self._auth = authenticator
        self._api_keys = api_keys
        self._metrics = metrics
        self._node_id = node_id
        self._auth_timeout = auth_timeout_seconds
        self._max_inflight = max_inflight_batches
        self._write_stall = write_stall_seconds

    # Written with context.read/write rather than as a generator: a session writes from
    # two tasks (deliveries and send results), so the stub's generator type does not fit.
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: Ctx
    ) -> None:
        """One device session: handshake, then sends/acks up and deliveries down."""
        try:
            try:
                async with asyncio.timeout(self._auth_timeout):
                    address, receive = await self._handshake(context)
            except TimeoutError as exc:
                raise Unauthenticated(
                    f"handshake not done within {self._auth_timeout} s "
                    "(limits.auth_timeout_seconds)"
                ) from exc
            async with self._relay.session(address, receive=receive) as session:
                await context.write(
                    relay_pb2.ServerFrame(
                        ready=relay_pb2.Ready(node_id=self._node_id, session_epoch=session.epoch)
                    )
                )
                await self._serve(session, context, asyncio.Lock())
        except RelayError as exc:
            if exc.status is Status.UNAUTHENTICATED:
                self._metrics.auth_failures.inc()
            await abort(context, exc)

    async def _read(self, context: Ctx, what: str) -> relay_pb2.ClientFrame:
        frame: object = await context.read()
        if frame is grpc.aio.EOF:
            raise Unauthenticated(f"stream closed before the {what} frame")
        assert isinstance(frame, relay_pb2.ClientFrame)
        if frame.WhichOneof("frame") != what:
            raise InvalidArgument(
                f"expected a {what} frame, got {frame.WhichOneof('frame') or 'an empty frame'}"
            )
        return frame

    async def _handshake(self, context: Ctx) -> tuple[Address, bool]:
        """Hello, challenge, auth: the authenticated device and whether it receives."""
        hello = (await self._read(context, "hello")).hello
        address = address_from_pb(hello.address).validate(field="hello.address")
        challenge = self._auth.challenge(address)
        await context.write(
            relay_pb2.ServerFrame(
                challenge=relay_pb2.Challenge(
                    nonce=challenge.nonce,
                    node_id=challenge.node_id,
                    server_time_ms=challenge.server_time_ms,
                )
            )
        )
        auth = (await self._read(context, "auth")).auth
        await self._auth.verify(challenge, auth.signature)
        return address, hello.receive

    async def _serve(self, session: Session, context: Ctx, lock: asyncio.Lock) -> None:
        # A send that failed other than with a RelayError (e.g. its write) ends the call.
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        reader = asyncio.ensure_future(self._read_frames(session, context, lock, failed))
        # Ended from outside (displaced, device removed): closes the stream at once,
        # even a send-only one, or one whose writer waits on a slow reader.
        ended = asyncio.ensure_future(session.ended())
        tasks: set[asyncio.Future[None]] = {reader, ended, failed}
        if session.receive:
            tasks.add(asyncio.ensure_future(self._write_events(session, context, lock)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            # Every task is awaited (a second one failing must not leave the rest).
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # re-raise a RelayError (e.g. displaced) to abort the call

    async def _read_frames(
        self,
        session: Session,
        context: Ctx,
        lock: asyncio.Lock,
        failed: asyncio.Future[None],
    ) -> None:
        """Read frames until EOF; sends are handled concurrently, in order (SendOrder).

        At most ``limits.max_stream_inflight_batches`` sends are unanswered at once;
        past it no further frame is read (the client is held back by flow control).
        At EOF the unanswered sends are finished and answered before the call ends.
        """
        inflight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self._max_inflight)

        def done(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None and not failed.done():
                failed.set_exception(task.exception())  # type: ignore[arg-type]

        try:
            while True:
                frame: object = await context.read()
                if frame is grpc.aio.EOF:
                    break
                assert isinstance(frame, relay_pb2.ClientFrame)
                kind = frame.WhichOneof("frame")
                if kind == "send":
                    await slots.acquire()
                    turn = session.order.turn()  # in frame order, before any await
                    task = asyncio.create_task(
                        self._answer(session, frame.send, turn, context, lock)
                    )
                    inflight.add(task)
                    task.add_done_callback(done)
                elif kind == "ack":
                    if not session.receive:
                        raise InvalidArgument(
                            "a send-only session (hello.receive=false) cannot ack"
                        )
                    await self._relay.ack(session, list(frame.ack.message_ids))
                else:
                    raise InvalidArgument(
                        f"unexpected {kind or 'empty'} frame after authentication"
                    )
            if inflight:
                await asyncio.gather(*inflight)
        finally:
            for task in inflight:
                task.cancel()

    async def _answer(
        self,
        session: Session,
        batch: relay_pb2.SendBatch,
        turn: Turn,
        context: Ctx,
        lock: asyncio.Lock,
    ) -> None:
        """Handle one SendBatch of a stream and write its SendResults."""
        reply = relay_pb2.ServerFrame()
        answer = reply.send_results
        answer.batch_id = batch.batch_id
        try:
            outcomes, mismatches = await self._send(
                session.address, batch.envelopes, batch.complete_device_lists, session, turn
            )
            add_results(answer.results, outcomes)
            answer.device_list_mismatches.extend(mismatches_to_pb(mismatches))
        except RelayError as exc:
            answer.results.extend(_batch_failure(e, exc) for e in batch.envelopes)
        finally:
            turn.resolved()
        async with lock:
            await context.write(reply)

    async def _write_events(self, session: Session, context: Ctx, lock: asyncio.Lock) -> None:
        async for event in session.events():
            if isinstance(event, Deliver):
                frame = relay_pb2.ServerFrame()
                add = frame.deliver.envelopes.add
                for env in event.envelopes:
                    fill_envelope(add(), env)
                count = len(event.envelopes)
            else:
                assert isinstance(event, QueueEmpty)
                frame = relay_pb2.ServerFrame(queue_empty=relay_pb2.QueueEmpty())
                count = 0
            try:
                async with asyncio.timeout(self._write_stall):
                    async with lock:
                        await context.write(frame)
            except TimeoutError as exc:
                raise WriteStalled(
                    f"the device read nothing for {self._write_stall} s "
                    "(limits.write_stall_seconds): session ended, reconnect to resume"
                ) from exc
            self._metrics.delivered.inc(count)
            if count:
                assert isinstance(event, Deliver)
                histogram = (
                    self._metrics.delivery_direct if event.live else self._metrics.delivery_stored
                )
                now_ms = time.time() * 1000
                for env in event.envelopes:
                    histogram.observe(max(0.0, now_ms - env.server_timestamp_ms) / 1000)

    @unary
    async def Send(
        self, request: relay_pb2.SendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> relay_pb2.SendResponse:
        """Batch send by a server-side sender holding a tenant API key."""
        metadata = dict(context.invocation_metadata() or ())
        bearer = str(metadata.get("authorization", ""))
        key = bearer.removeprefix("Bearer ").strip() if bearer.startswith("Bearer ") else None
        try:
            if key is not None and not call_is_protected(context):
                # The key crossed the network in the clear already; refusing it here
                # keeps clients from relying on that (and says so at the first try).
                raise Unauthenticated(BEARER_NEEDS_TLS)
            sender = self._api_keys.authenticate(key)
        except Unauthenticated:
            self._metrics.auth_failures.inc()
            raise
        outcomes, mismatches = await self._send(
            sender.address, request.envelopes, request.complete_device_lists
        )
        response = relay_pb2.SendResponse(device_list_mismatches=mismatches_to_pb(mismatches))
        add_results(response.results, outcomes)
        return response

    async def _send(
        self,
        sender: Address,
        envelopes: Sequence[relay_pb2.Envelope],
        complete_for: Sequence[relay_pb2.UserRef],
        session: Session | None = None,
        turn: Turn | None = None,
    ) -> tuple[list[SendOutcome], list[DeviceListMismatch]]:
        envs = [envelope_from_pb(e, sender) for e in envelopes]
        if not complete_for:
            return await self._relay.send(sender, envs, session, turn=turn), []
        return await self._relay.send_checked(
            sender,
            envs,
            [e.recipient_registration_id for e in envelopes],
            [(u.tenant, u.user) for u in complete_for],
            session,
            turn=turn,
        )


def _batch_failure(env: relay_pb2.Envelope, exc: RelayError) -> relay_pb2.SendResult:
    return relay_pb2.SendResult(
        message_id=env.message_id,
        recipient=env.recipient,
        outcome=relay_pb2.OUTCOME_REJECTED,
        code=int(exc.status),
        message=exc.message,
        limit=exc.metadata.get("limit", ""),
    )
