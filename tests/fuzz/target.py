"""The servers under fuzz, the devices registered on them, and the properties checked.

One ``Target`` per test module: a key directory and a relay node in-process on
127.0.0.1 port 0, on the embedded SQLite backend, sharing a fake clock. Every request
goes through ``Target.unary`` (or ``tests.fuzz.streams``), which checks:

* the status is never UNKNOWN or INTERNAL, and no call hangs (a DEADLINE_EXCEEDED of
  the client's ``CALL_TIMEOUT`` counts as a hang);
* an OK answer parses as the method's response type;
* a refused call (any status but OK) leaves every table of every SQLite file in the
  data directory exactly as it was.

``Target.assert_serving`` checks between examples that both servers still answer
health checks and a known-good call from a device no fuzzed request is about.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from keyserver.app import KeyserverApp
from keyserver.client import (
    COUNT_ONE_TIME_PREKEYS_METHOD,
    request_body,
    sign_request_metadata,
)
from relay import authproof
from relay.clock import FakeClock
from relay.common.convert import address_to_pb
from relay.config import ApiKeyConfig
from relay.server.app import RelayApp
from relaypb.common.v1 import address_pb2
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.conftest import test_config
from tests.fuzz.messages import Hints
from tests.fuzz.methods import Rpc, parse
from tests.fuzz.payloads import (
    AUTHORIZATION,
    DEVICE,
    SIGNATURE,
    TIME,
    VALID_API_KEY,
    Anonymous,
    Bearer,
    Credentials,
    Header,
    Headers,
    SignedBy,
)
from tests.fuzz.roster import Member, enroll

#: Seconds a call may take before it counts as a hang.
CALL_TIMEOUT = 10.0
#: Statuses no request may get: the server did not know what went wrong, or hung.
BAD_CODES = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
)
#: The API key of tenant "other" (Relay.Send's server-side senders).
API_KEY = "fuzz-api-key-of-tenant-other-0123456789"
#: Limits low enough that fuzzed sends hit them and queues stay small.
LIMITS = {
    "limits.max_queue_depth": 100,
    "limits.max_queue_bytes": 4 * 1024 * 1024,
}
#: Who the roster holds: (name, tenant, user). ``victim`` owns what requests are about;
#: ``eve`` (same tenant) and ``mallory`` (another tenant) sign; no fuzzed request names
#: ``canary``, whose calls show the servers still work.
ROSTER = (
    ("victim", "default", "victim"),
    ("eve", "default", "eve"),
    ("mallory", "other", "mallory"),
    ("canary", "canary", "canary"),
)
SIGNERS = ("eve", "mallory")

Snapshot = Mapping[str, tuple[tuple[Any, ...], ...]]


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status, details, and the response bytes when OK."""

    code: grpc.StatusCode
    details: str
    response: bytes | None = None


class SqliteState:
    """Read-only views of every SQLite file in a data directory, for before/after checks.

    A snapshot maps ``file:table`` to all of the table's rows (ordered by every column),
    plus ``file:sqlite_master`` for the schema. It is read again only when
    ``PRAGMA data_version`` says another connection committed since the last read, so
    a snapshot costs one pragma when nothing changed.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._connections: dict[Path, sqlite3.Connection] = {}
        self._checked: dict[Path, bool] = {}  # path -> whether it is a SQLite database
        self._cache: dict[Path, tuple[int, dict[str, tuple[tuple[Any, ...], ...]]]] = {}

    def close(self) -> None:
        """Close the read-only connections."""
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def files(self) -> list[Path]:
        """The SQLite databases in the data directory (by their file header)."""
        return [path for path in sorted(self._data_dir.iterdir()) if self._is_database(path)]

    def _is_database(self, path: Path) -> bool:
        known = self._checked.get(path)
        if known is not None:
            return known
        if not path.is_file() or path.suffix in {".wal", ".shm", ".journal"}:
            self._checked[path] = False
            return False
        with path.open("rb") as f:
            header = f.read(16)
        if len(header) == 16:  # a shorter file may still become a database: look again
            self._checked[path] = header == b"SQLite format 3\x00"
        return header == b"SQLite format 3\x00"

    def snapshot(self) -> Snapshot:
        """Every row of every table of every database, as of now."""
        out: dict[str, tuple[tuple[Any, ...], ...]] = {}
        for path in self.files():
            out.update(self._tables(path))
        return out

    def _tables(self, path: Path) -> dict[str, tuple[tuple[Any, ...], ...]]:
        connection = self._connections.get(path)
        if connection is None:
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            self._connections[path] = connection
        connection.execute("BEGIN")
        try:
            (version,) = connection.execute("PRAGMA data_version").fetchone()
            cached = self._cache.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
            tables = _read_tables(connection, path.name)
        finally:
            connection.execute("COMMIT")
        self._cache[path] = (version, tables)
        return tables


#: Rows that are bookkeeping, not state. A device-signed request is remembered once its
#: signature verifies, whatever the answer, for the 60 s it could be replayed: replay
#: protection must not wait for the outcome (a request in flight could be replayed
#: meanwhile). Registration tokens (kind 'token') are compared: only a registration
#: that succeeds spends one.
_BOOKKEEPING = {"once_only": "WHERE kind != 'request'"}


def _read_tables(
    connection: sqlite3.Connection, prefix: str
) -> dict[str, tuple[tuple[Any, ...], ...]]:
    schema = tuple(
        connection.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    )
    tables = {f"{prefix}:sqlite_master": schema}
    for kind, name, _ in schema:
        if kind != "table" or name.startswith("sqlite_"):
            continue
        quoted = '"' + name.replace('"', '""') + '"'
        with closing(connection.execute(f"SELECT * FROM {quoted} LIMIT 0")) as cursor:
            width = len(cursor.description)
        order = ", ".join(str(i) for i in range(1, width + 1))
        where = _BOOKKEEPING.get(name, "")
        rows = connection.execute(f"SELECT * FROM {quoted} {where} ORDER BY {order}")
        tables[f"{prefix}:{name}"] = tuple(rows)
    return tables


def changed_tables(before: Snapshot, after: Snapshot) -> list[str]:
    """Names of the tables whose rows differ (or that exist in only one snapshot)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def describe(payload: bytes, parsed: Message | None, credentials: object) -> str:
    """A request in a form a person can replay: bytes, text format, credentials."""
    shown = payload[:256].hex() + ("..." if len(payload) > 256 else "")
    text = "(does not parse)" if parsed is None else text_format.MessageToString(parsed)
    if len(text) > 2000:
        text = text[:2000] + "..."
    return (
        f"payload ({len(payload)} bytes): {shown}\n"
        f"as text: {text or '(empty message)'}\n"
        f"credentials: {str(credentials)[:500]}"
    )


def check_answer(
    rpc: Rpc,
    outcome: Outcome,
    before: Snapshot,
    state: SqliteState,
    payload: bytes,
    credentials: object,
) -> None:
    """Assert the properties of one answer (see the module docstring).

    ``before`` is the snapshot of ``state`` taken before the call.
    """

    def what() -> str:
        parsed = rpc.parse_request(payload)
        return f"{rpc.path} -> {outcome.code.name}: {outcome.details}\n" + describe(
            payload, parsed, credentials
        )

    assert outcome.code not in BAD_CODES, what()
    if outcome.code is grpc.StatusCode.OK:
        assert outcome.response is not None
        assert parse(rpc.response, outcome.response) is not None, (
            f"the response does not parse as {rpc.response.full_name}\n{what()}"
        )
        return
    changed = changed_tables(before, state.snapshot())
    assert not changed, f"a refused request changed {changed}\n{what()}"


def _address_pb(tenant: str, user: str, device: int) -> address_pb2.Address:
    return address_pb2.Address(tenant=tenant, user=user, device=device)


class Target:
    """Running servers, the roster of registered devices, and the checked calls."""

    def __init__(
        self,
        keys_channel: grpc.aio.Channel,
        relay_channel: grpc.aio.Channel,
        clock: FakeClock,
        state: SqliteState,
        roster: Mapping[str, Member],
    ) -> None:
        self.keys_channel = keys_channel
        self.relay_channel = relay_channel
        self.clock = clock
        self.state = state
        self.roster = roster
        self.hints = self._hints()

    def _hints(self) -> Hints:
        fuzzed = [d for name, d in self.roster.items() if name != "canary"]
        addresses = [address_to_pb(d.address) for d in fuzzed]
        victim = self.roster["victim"].address
        addresses += [
            _address_pb(victim.tenant, victim.user, n) for n in (0, 2, 2**31 - 1, 2**31, 2**32 - 1)
        ]
        addresses += [
            _address_pb(victim.tenant.upper(), victim.user, victim.device),
            _address_pb(victim.tenant, victim.user.upper(), victim.device),
            _address_pb(victim.tenant, victim.user + "\x00", victim.device),
            _address_pb(victim.tenant + " ", victim.user, victim.device),
            _address_pb("", "", 0),
        ]
        tenants = sorted({d.address.tenant for d in fuzzed})
        users = sorted({d.address.user for d in fuzzed})
        identity_keys = [d.identity_key for d in fuzzed]
        return Hints(
            fields={
                "tenant": st.sampled_from(tenants),
                "user": st.sampled_from(users),
                "device": st.sampled_from((1, 2)),
                "devices": st.sampled_from((1, 2)),
                "identity_key": st.sampled_from(identity_keys),
                "message_id": st.binary(min_size=16, max_size=16),
                "request_id": st.binary(min_size=16, max_size=16),
            },
            messages={
                "relaypb.common.v1.Address": st.sampled_from(addresses),
                "relaypb.relay.v1.UserRef": st.sampled_from(
                    [relay_pb2.UserRef(tenant=t, user=u) for t in tenants for u in users]
                ),
            },
        )

    def channel(self, rpc: Rpc) -> grpc.aio.Channel:
        """The channel to the server of ``rpc``."""
        return self.relay_channel if rpc.on_relay else self.keys_channel

    def metadata(self, rpc: Rpc, payload: bytes, credentials: Credentials) -> tuple[Header, ...]:
        """The headers ``credentials`` stand for on a call of ``rpc`` with ``payload``."""
        if isinstance(credentials, Anonymous):
            return ()
        if isinstance(credentials, Headers):
            return tuple((k, _real_key(v)) for k, v in credentials.pairs)
        if isinstance(credentials, Bearer):
            return ((AUTHORIZATION, "Bearer " + credentials.token.replace(VALID_API_KEY, API_KEY)),)
        return self.signed(rpc, payload, credentials)

    def signed(self, rpc: Rpc, payload: bytes, plan: SignedBy) -> tuple[Header, ...]:
        """Headers signed by ``plan.signer`` for ``payload``, spoilt as ``plan`` says."""
        device = self.roster[plan.signer]
        parsed = rpc.parse_request(payload)
        honest = SignedBy(plan.signer, extra=plan.extra)
        if parsed is not None and plan == honest:
            signed = sign_request_metadata(
                rpc.path, device.address, device.signing_key, parsed, self.clock
            )
            self.clock.advance(1)  # two signed requests never share a millisecond
            return (*signed, *plan.extra)
        time_ms = self.clock.now_ms() + plan.skew_ms
        self.clock.advance(1)
        body = payload if parsed is None else request_body(parsed)
        if plan.tampered:
            body += b"\x00"
        transcript = authproof.request_transcript(
            plan.method or rpc.path, device.address, time_ms, body
        )
        return (
            (DEVICE, plan.claim or authproof.format_address(device.address)),
            (TIME, str(time_ms)),
            (SIGNATURE, device.signing_key.sign(transcript)),
            *plan.extra,
        )

    async def unary(self, rpc: Rpc, payload: bytes, credentials: Credentials) -> Outcome:
        """Call ``rpc`` with raw ``payload``; fail if the answer breaks a property."""
        metadata = self.metadata(rpc, payload, credentials)
        before = self.state.snapshot()
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
        call = self.channel(rpc).unary_unary(rpc.path)
        try:
            response = await call(payload, metadata=metadata, timeout=CALL_TIMEOUT)
            outcome = Outcome(grpc.StatusCode.OK, "", response)
        except grpc.aio.AioRpcError as exc:
            outcome = Outcome(exc.code(), exc.details() or "")
        check_answer(rpc, outcome, before, self.state, payload, credentials)
        return outcome

    async def assert_serving(self) -> None:
        """Both servers answer health checks; the canary's signed call and session work."""
        for channel in (self.keys_channel, self.relay_channel):
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        canary = self.roster["canary"]
        request = keys_pb2.CountOneTimePrekeysRequest(device=address_to_pb(canary.address))
        metadata = sign_request_metadata(
            COUNT_ONE_TIME_PREKEYS_METHOD,
            canary.address,
            canary.signing_key,
            request,
            self.clock,
        )
        self.clock.advance(1)
        stub = keys_pb2_grpc.KeyDirectoryStub(self.keys_channel)
        await stub.CountOneTimePrekeys(request, metadata=metadata, timeout=CALL_TIMEOUT)
        await self.canary_session()

    async def canary_session(self) -> None:
        """The canary authenticates on Connect, gets Ready, and ends its stream cleanly."""
        canary = self.roster["canary"]
        call = relay_pb2_grpc.RelayStub(self.relay_channel).Connect(timeout=CALL_TIMEOUT)
        hello = relay_pb2.Hello(address=address_to_pb(canary.address), receive=True)
        await call.write(relay_pb2.ClientFrame(hello=hello))
        first = await call.read()
        assert isinstance(first, relay_pb2.ServerFrame), first
        ch = first.challenge
        transcript = authproof.connect_transcript(
            ch.nonce, ch.node_id, ch.server_time_ms, canary.address
        )
        auth = relay_pb2.AuthResponse(signature=canary.signing_key.sign(transcript))
        await call.write(relay_pb2.ClientFrame(auth=auth))
        second = await call.read()
        assert isinstance(second, relay_pb2.ServerFrame), second
        assert second.WhichOneof("frame") == "ready", second
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        assert await call.code() is grpc.StatusCode.OK

    def tick(self) -> None:
        """Move the servers' clock on a little (rate limit windows, caches, expiries)."""
        self.clock.advance(250)


def _real_key(value: str | bytes) -> str | bytes:
    if isinstance(value, str):
        return value.replace(VALID_API_KEY, API_KEY)
    return value


def _write_api_key(data_dir: Path) -> Path:
    """Create ``data_dir`` and, next to it, the file holding ``API_KEY``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir.parent / "api.key"
    key_file.write_text(API_KEY + "\n")
    return key_file


@asynccontextmanager
async def running_target(data_dir: Path) -> AsyncIterator[Target]:
    """Start both servers on ``data_dir``, register the roster, and yield the Target."""
    key_file = _write_api_key(data_dir)
    clock = FakeClock()
    config = test_config(data_dir, **LIMITS)
    config = dataclasses.replace(config, api_keys=(ApiKeyConfig("other", "fuzz", str(key_file)),))
    async with AsyncExitStack() as stack:
        keys = await stack.enter_async_context(KeyserverApp(config, clock))
        config = dataclasses.replace(
            config, keyserver=dataclasses.replace(config.keyserver, target=keys.address)
        )
        relay = await stack.enter_async_context(RelayApp(config, clock))
        keys_channel = await stack.enter_async_context(grpc.aio.insecure_channel(keys.address))
        relay_channel = await stack.enter_async_context(grpc.aio.insecure_channel(relay.address))
        roster = {
            name: await enroll(keys_channel, tenant, user, clock) for name, tenant, user in ROSTER
        }
        state = SqliteState(data_dir)
        stack.callback(state.close)
        target = Target(keys_channel, relay_channel, clock, state, roster)
        await target.assert_serving()
        yield target
