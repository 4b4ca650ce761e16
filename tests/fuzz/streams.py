"""Hostile frames on the streaming RPCs, above all Relay.Connect driven step by step.

Any streaming method gets ``run_stream``: generated request messages written one after
the other, a half-close, and every response read (each must parse). Connect has its
own driver, ``run_session``, for a session drawn as a list of ``Step``s: raw frames
(generated ClientFrames or other bytes), hellos for roster devices, answers to the
challenge signed by some roster device, and acks of envelopes delivered so far.

Until Ready every frame is followed by one read (the server answers each or ends the
stream), so a signature can cover the challenge just received; after Ready the driver
waits for each send's results and writes everything else without waiting. Then the
client half-closes and reads to the end. Besides the status (never UNKNOWN, INTERNAL,
or a hang) it checks:

* every server frame parses, and comes in order: one challenge, then Ready only after an
  answer signed by the identity key of the device the hello named, then deliveries and
  send results only after Ready;
* deliveries go only to a receiving session and are addressed to its device;
* each SendResults names a batch sent after Ready and has one result per envelope;
* a stream that never got Ready changes no stored state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from hypothesis import strategies as st

from relay import authproof
from relay.common.convert import address_to_pb
from relay.model import Address
from relaypb.common.v1 import address_pb2
from relaypb.relay.v1 import relay_pb2
from tests.fuzz.messages import Hints
from tests.fuzz.methods import Rpc, parse
from tests.fuzz.payloads import Credentials, parsable_payloads, serialized, unparsable_payloads
from tests.fuzz.target import BAD_CODES, CALL_TIMEOUT, Target, changed_tables, describe

CLIENT_FRAME = relay_pb2.ClientFrame.DESCRIPTOR
#: A device no one registered (its hello gets a challenge; no answer verifies).
GHOST = Address("default", "ghost", 1)


@dataclass(frozen=True)
class Frame:
    """Write these bytes as one frame (a ClientFrame, or not quite one)."""

    payload: bytes


@dataclass(frozen=True)
class HelloAs:
    """A hello naming roster device ``member`` ("ghost": an unregistered device)."""

    member: str
    receive: bool = True
    client_version: str = ""


@dataclass(frozen=True)
class AuthAs:
    """Answer the last challenge with ``signer``'s identity key.

    The transcript names ``claim``'s address (default: the device of the last hello),
    so a signer other than that device is an impostor.
    """

    signer: str
    claim: str | None = None


@dataclass(frozen=True)
class AckSeen:
    """Ack envelopes delivered so far, chosen by index (modulo how many there are)."""

    picks: tuple[int, ...]


Step = Frame | HelloAs | AuthAs | AckSeen


def steps(hints: Hints, members: Sequence[str]) -> st.SearchStrategy[list[Step]]:
    """Sessions of 1..8 steps, often starting with a hello and an answer to it."""
    names = [*members, "ghost"]
    raw = st.one_of(serialized(CLIENT_FRAME, hints), parsable_payloads(CLIENT_FRAME, hints))
    step: st.SearchStrategy[Step] = st.one_of(
        raw.map(Frame),
        st.builds(
            HelloAs,
            member=st.sampled_from(names),
            receive=st.booleans(),
            client_version=st.sampled_from(("", "fuzz/1.0", "\x00", "é" * 300)),
        ),
        st.builds(
            AuthAs,
            signer=st.sampled_from(members),
            claim=st.one_of(st.none(), st.sampled_from(names)),
        ),
        st.builds(AckSeen, picks=st.lists(st.integers(0, 2**16), max_size=4).map(tuple)),
    )
    typical = st.tuples(
        st.builds(HelloAs, member=st.sampled_from(names), receive=st.booleans()),
        st.builds(AuthAs, signer=st.sampled_from(members)),
        st.lists(step, max_size=6),
    ).map(lambda t: [t[0], t[1], *t[2]])
    return st.one_of(st.lists(step, min_size=1, max_size=8), typical)


def unparsable_frames(hints: Hints) -> st.SearchStrategy[bytes]:
    """Frames the ClientFrame parser refuses."""
    return unparsable_payloads(CLIENT_FRAME, hints)


@dataclass
class _Session:
    """What the client knows while it drives one stream."""

    target: Target
    hello: Address | None = None
    receive: bool = False
    challenge: relay_pb2.Challenge | None = None
    authentic: bool = False  # the last auth answer was signed by the hello's device
    ready: bool = False
    batches: list[tuple[int, int]] = field(default_factory=list)  # (batch id, envelopes)
    delivered: list[bytes] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    written: int = 0
    signed_for_hello: bool = False  # the auth being encoded is signed by the hello's device

    def address(self, member: str) -> Address:
        return GHOST if member == "ghost" else self.target.roster[member].address

    def encode(self, step: Step) -> bytes:
        """The bytes of ``step`` given what the session has seen."""
        if isinstance(step, Frame):
            frame = parse(CLIENT_FRAME, step.payload)
            if isinstance(frame, relay_pb2.ClientFrame):
                self._note_written(frame)
            else:
                self.written += 1
                self.log.append("> (does not parse)")
            return step.payload
        if isinstance(step, HelloAs):
            hello = relay_pb2.Hello(
                address=address_to_pb(self.address(step.member)),
                receive=step.receive,
                client_version=step.client_version,
            )
            frame = relay_pb2.ClientFrame(hello=hello)
        elif isinstance(step, AuthAs):
            frame = relay_pb2.ClientFrame(auth=relay_pb2.AuthResponse(signature=self._sign(step)))
        else:
            seen = self.delivered
            ids = [seen[i % len(seen)] for i in step.picks] if seen else []
            frame = relay_pb2.ClientFrame(ack=relay_pb2.AckBatch(message_ids=ids))
        self._note_written(frame)
        return frame.SerializeToString()

    def _sign(self, step: AuthAs) -> bytes:
        claimed = self.address(step.claim) if step.claim else self.hello or GHOST
        challenge = self.challenge or relay_pb2.Challenge()
        transcript = authproof.connect_transcript(
            challenge.nonce, challenge.node_id, challenge.server_time_ms, claimed
        )
        signer = self.target.roster[step.signer]
        self.signed_for_hello = (
            self.challenge is not None and signer.address == claimed == self.hello
        )
        return signer.signing_key.sign(transcript)

    def _note_written(self, frame: relay_pb2.ClientFrame) -> None:
        self.written += 1
        kind = frame.WhichOneof("frame")
        self.log.append(f"> {kind or 'empty'}")
        if kind == "hello" and self.written == 1:  # only a first frame can be the hello
            self.hello = _address(frame.hello.address)
            self.receive = frame.hello.receive
        elif kind == "auth":  # only a second frame can be the answer
            self.authentic = self.signed_for_hello and self.written == 2
            self.signed_for_hello = False
        elif kind == "send" and self.ready:
            self.batches.append((frame.send.batch_id, len(frame.send.envelopes)))

    def receive_frame(self, data: bytes) -> None:
        """Check one server frame against what was sent so far."""
        frame = parse(relay_pb2.ServerFrame.DESCRIPTOR, data)
        assert frame is not None, f"a server frame does not parse: {data[:64].hex()}"
        assert isinstance(frame, relay_pb2.ServerFrame)
        kind = frame.WhichOneof("frame")
        self.log.append(f"< {kind}")
        if kind == "challenge":
            assert self.hello is not None and self.challenge is None, self.log
            self.challenge = frame.challenge
        elif kind == "ready":
            assert self.authentic and not self.ready, f"Ready without a valid answer: {self.log}"
            self.ready = True
        elif kind in {"deliver", "queue_empty"}:
            assert self.ready and self.receive, f"{kind} on a session that may not: {self.log}"
            for envelope in frame.deliver.envelopes:
                assert envelope.recipient == address_to_pb(self.hello or GHOST), (
                    f"delivered to {self.hello} an envelope for {envelope.recipient}"
                )
                self.delivered.append(envelope.message_id)
        elif kind == "send_results":
            results = frame.send_results
            sent = [n for batch, n in self.batches if batch == results.batch_id]
            assert self.ready and sent, f"results of a batch never sent: {self.log}"
            self.batches.remove((results.batch_id, sent[0]))
            assert len(results.results) == sent[0], (
                f"{len(results.results)} results for {sent[0]} envelopes"
            )
        else:
            raise AssertionError(f"unexpected server frame {kind}: {self.log}")


def _address(pb: address_pb2.Address) -> Address:
    return Address(pb.tenant, pb.user, pb.device)


async def _read(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> bytes | None:
    """The next frame, or None at the end of the stream (its status tells how)."""
    try:
        data = await call.read()
    except grpc.aio.AioRpcError:
        return None
    if data is grpc.aio.EOF:
        return None
    assert isinstance(data, bytes)
    return data


async def _write(call: grpc.aio.StreamStreamCall[bytes, bytes], data: bytes) -> bool:
    """Write one frame; False if the stream has ended (then nothing more is sent)."""
    try:
        await call.write(data)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return False
    return True


#: What grpc reports, locally, for a write into a stream the server has just ended: the
#: server's own status is lost. Only a call whose write failed may end with it.
CLIENT_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")


async def _receive(call: grpc.aio.StreamStreamCall[bytes, bytes], session: _Session) -> bool:
    """Read and check one server frame; False at the end of the stream."""
    frame = await _read(call)
    if frame is None:
        return False
    session.receive_frame(frame)
    return True


async def run_session(
    target: Target, rpc: Rpc, plan: Sequence[Step], credentials: Credentials
) -> grpc.StatusCode:
    """Drive one Connect stream through ``plan``; fail if it breaks a property.

    Before Ready the server answers every frame or ends the stream, and after it a send
    gets its SendResults: the driver waits for those, so that it seldom writes into a
    stream the server already ended (which grpc reports as ``CLIENT_WRITE_FAILED``).
    """
    session = _Session(target)
    before = target.state.snapshot()
    metadata = target.metadata(rpc, b"", credentials)
    call: grpc.aio.StreamStreamCall[bytes, bytes] = target.relay_channel.stream_stream(rpc.path)(
        metadata=metadata, timeout=CALL_TIMEOUT
    )
    write_failed = False
    for step in plan:
        data = session.encode(step)
        if not await _write(call, data):
            write_failed = True
            break
        if not session.ready:
            if not await _receive(call, session):
                break
            continue
        while session.batches and await _receive(call, session):
            pass
        if session.batches:  # the stream ended before the results came
            break
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.done_writing()
    while await _receive(call, session):
        pass
    code = await call.code()
    details = await call.details()

    def what() -> str:
        shown = "\n".join(
            describe(s.payload, parse(CLIENT_FRAME, s.payload), "") if isinstance(s, Frame)
            else repr(s)
            for s in plan
        )  # fmt: skip
        return f"{rpc.path} -> {code.name}: {details}\nframes: {session.log}\nplan:\n{shown}"

    if not (write_failed and (code, details) == CLIENT_WRITE_FAILED):
        assert code not in BAD_CODES, what()
    if not session.ready and code is not grpc.StatusCode.OK:
        changed = changed_tables(before, target.state.snapshot())
        assert not changed, f"a refused session changed {changed}\n{what()}"
    return code


async def run_stream(
    target: Target, rpc: Rpc, requests: Sequence[bytes], credentials: Credentials
) -> grpc.StatusCode:
    """Write ``requests`` on one call of streaming ``rpc``, half-close, read to the end."""
    before = target.state.snapshot()
    metadata = target.metadata(rpc, b"", credentials)
    call: grpc.aio.StreamStreamCall[bytes, bytes] = target.channel(rpc).stream_stream(rpc.path)(
        metadata=metadata, timeout=CALL_TIMEOUT
    )
    write_failed = False
    for request in requests:
        if not await _write(call, request):
            write_failed = True
            break
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.done_writing()
    while (frame := await _read(call)) is not None:
        assert parse(rpc.response, frame) is not None, f"a response does not parse: {frame!r}"
    code, details = await call.code(), await call.details()
    what = f"{rpc.path} -> {code.name}: {details}\n" + "\n".join(
        describe(r, rpc.parse_request(r), credentials) for r in requests
    )
    if not (write_failed and (code, details) == CLIENT_WRITE_FAILED):
        assert code not in BAD_CODES, what
    if code is not grpc.StatusCode.OK:
        changed = changed_tables(before, target.state.snapshot())
        assert not changed, f"a refused stream changed {changed}\n{what}"
    return code
