"""A cassandra-driver session for asyncio: prepared statements, bounded writes, one error type.

The driver runs its own I/O thread and hands back ``ResponseFuture`` objects; ``execute``
bridges each one to an asyncio future (callbacks hop threads with
``call_soon_threadsafe``), so the event loop never blocks on Cassandra. Only the rare,
blocking driver calls (connecting, preparing a statement the first time, fetching a
query trace, shutting down) run in a worker thread.

Driver errors are translated as they leave this module (``errors.translate``): an
outage is ``relay.errors.Unavailable`` naming the operation, so callers answer
UNAVAILABLE and never acknowledge a write that is not durable.

If Cassandra is down when the session opens, it logs a warning and stays usable: each
operation tries to connect again (at most once per ``RECONNECT_INTERVAL_SECONDS``) and
raises ``Unavailable`` until the cluster answers. Once connected, the driver reconnects
to nodes on its own.

TLS is on when ``cassandra.ssl_ca_file`` is set (``relay.common.store_tls``): the
driver gets an ``ssl.SSLContext`` that verifies each node against that CA (and the
address it was reached by, unless ``ssl_check_hostname = false``) and presents
``ssl_cert_file`` if set. A failed handshake is an ``Unavailable`` that says which
node's certificate did not verify against which CA file, or that the host name did not
match, or that the node wants or refused a client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import cassandra
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)
from cassandra.query import (
    BatchStatement,
    BatchType,
    PreparedStatement,
    SimpleStatement,
    tuple_factory,
)

from relay.common.cassandra.errors import OUTAGES, translate
from relay.common.store_tls import cassandra_tls
from relay.config import CassandraConfig, ConfigError
from relay.errors import RelayError, Unavailable

#: Longest wait for a schema statement (migrations), agreement included.
DDL_TIMEOUT_SECONDS = 120.0
#: Longest wait for the driver to shut down.
SHUTDOWN_SECONDS = 15.0
log = logging.getLogger(__name__)

#: While Cassandra is unreachable, an operation tries to connect at most this often.
RECONNECT_INTERVAL_SECONDS = 1.0
#: Rows per page when a query's result is fetched page by page.
FETCH_SIZE = 5000
#: Reconnection to a node that went away: 0.5 s, doubling, at most 10 s apart.
RECONNECT_BASE_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
#: How long to wait for a query trace to be written (tests and diagnostics only).
TRACE_WAIT_SECONDS = 10.0

#: Native protocol v5 (Cassandra 4.0 and later); set, not negotiated down at each connect.
PROTOCOL_VERSION = cassandra.ProtocolVersion.V5
#: Most statements and bytes in one single-partition batch.
BATCH_ROWS = 200
BATCH_BYTES = 1 << 20

Row = tuple[Any, ...]
#: A CQL text (prepared on first use) and its bound values.
Statement = tuple[str, tuple[Any, ...]]
T = TypeVar("T")


def read_password(config: CassandraConfig) -> str:
    """The password in ``config.password_file`` (surrounding whitespace stripped)."""
    try:
        return Path(config.password_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cassandra.password_file: {exc}") from exc


def build_cluster(config: CassandraConfig) -> Cluster:
    """A driver Cluster for ``config`` (not connected yet)."""
    policy = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=config.local_dc))
    profile = ExecutionProfile(
        load_balancing_policy=policy,
        consistency_level=cassandra.ConsistencyLevel.name_to_value[config.consistency],
        serial_consistency_level=cassandra.ConsistencyLevel.LOCAL_SERIAL,
        request_timeout=config.request_timeout_seconds,
        row_factory=tuple_factory,
    )
    auth = None
    if config.username:
        auth = PlainTextAuthProvider(config.username, read_password(config))
    tls = cassandra_tls(config)
    # The driver checks host names against each node's address when the context says so.
    ssl_context = tls.context() if tls is not None else None
    return Cluster(
        protocol_version=PROTOCOL_VERSION,
        contact_points=list(config.contact_points),
        port=config.port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        connect_timeout=config.request_timeout_seconds,
        control_connection_timeout=config.request_timeout_seconds,
        ssl_context=ssl_context,
        # The driver's default backs off to 10 minutes: after a long outage a node would
        # stay unreachable long after Cassandra answers again.
        reconnection_policy=ExponentialReconnectionPolicy(
            RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS
        ),
    )


def describe_connect_error(config: CassandraConfig, exc: BaseException, where: str) -> str:
    """Why connecting to ``where`` failed: the TLS reason if there is one, else ``exc``."""
    tls = cassandra_tls(config)
    if tls is not None:
        errors = getattr(exc, "errors", None)  # NoHostAvailable: endpoint -> error
        for endpoint, error in (errors or {}).items():
            if isinstance(error, BaseException):
                reason = tls.explain(error, str(endpoint))
                if reason is not None:
                    return reason
        reason = tls.explain(exc, where)
        if reason is not None:
            return reason
    return f"{type(exc).__name__}: {exc}"


def partition_batches(
    items: Iterable[tuple[Hashable, Statement, int]], *, max_rows: int = BATCH_ROWS
) -> list[list[Statement]]:
    """Group ``(partition, statement, bytes)`` items into single-partition batches.

    Each batch holds statements of one partition only (Cassandra applies it as one
    mutation, cheaply), at most ``max_rows`` of them and about ``BATCH_BYTES``.
    """
    open_: dict[Hashable, tuple[list[Statement], int]] = {}
    done: list[list[Statement]] = []
    for partition, statement, size in items:
        batch, total = open_.get(partition, ([], 0))
        if batch and (len(batch) >= max_rows or total + size > BATCH_BYTES):
            done.append(batch)
            batch, total = [], 0
        batch.append(statement)
        open_[partition] = (batch, total + size)
    done.extend(batch for batch, _ in open_.values())
    return done


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """Await all of ``aws`` concurrently; if any failed, raise the first error.

    Unlike a bare ``asyncio.gather``, nothing is left running (or unretrieved) when
    one of them fails.
    """
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _settle(fut: asyncio.Future[T], value: T | None, exc: BaseException | None) -> None:
    if fut.done():  # cancelled by the caller meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)  # type: ignore[arg-type]


def crc_mismatch(exc: BaseException) -> bool:
    """Whether a failed connect is the driver's v5 frame-header CRC bug (PYTHON-1337)."""
    errors = getattr(exc, "errors", None) or {}
    return any("CRC mismatch" in str(e) for e in errors.values())


class CassandraSession:
    """One connection pool to a cluster; an async context manager.

    ``keyspace`` defaults to ``config.keyspace``; pass ``""`` for no keyspace (migrations).
    ``on_error`` is told of every error a statement ends with (for metrics).
    """

    def __init__(
        self,
        config: CassandraConfig,
        *,
        keyspace: str | None = None,
        on_error: Callable[[RelayError], None] | None = None,
    ) -> None:
        self.config = config
        self._on_error = on_error
        self.keyspace = config.keyspace if keyspace is None else keyspace
        self._cluster: Cluster | None = None
        self._session: Any = None
        self._prepared: dict[str, asyncio.Future[PreparedStatement]] = {}
        self._connecting: asyncio.Lock | None = None
        self._last_attempt = float("-inf")
        self._last_error: BaseException | None = None
        self._writes = asyncio.Semaphore(max(1, config.write_concurrency))
        self._traces: list[list[str]] | None = None
        self._closed = False

    async def __aenter__(self) -> CassandraSession:
        try:
            await self.connect()
        except Unavailable as exc:
            log.warning("%s; will retry on use", exc)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether the session has connected to the cluster."""
        return self._session is not None

    async def connect(self, op: str = "connect") -> None:
        """Connect now if not connected; raise Unavailable (naming ``op``) if it fails."""
        if self._session is not None:
            return
        if self._closed:
            raise Unavailable(f"cassandra is unavailable for {op}: the session is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        where = f"{','.join(self.config.contact_points)}:{self.config.port}"
        async with self._connecting:
            if self._session is not None:
                return
            if time.monotonic() - self._last_attempt < RECONNECT_INTERVAL_SECONDS:
                last = self._last_error
                reason = (
                    describe_connect_error(self.config, last, where)
                    if last is not None
                    else "no attempt yet"
                )
                raise Unavailable(
                    f"cassandra is unavailable for {op}: cannot connect to {where} ({reason})"
                ) from last
            cluster = build_cluster(self.config)  # ConfigError (e.g. a TLS file) raises
            self._last_attempt = time.monotonic()
            try:
                try:
                    session = await asyncio.to_thread(cluster.connect)
                except NoHostAvailable as exc:
                    if not crc_mismatch(exc):
                        raise
                    # PYTHON-1337: the driver's v5 framing now and then misreads a frame
                    # header while it connects; a second attempt on a new cluster works.
                    log.warning("cassandra connect hit the driver's v5 CRC bug; retrying once")
                    await asyncio.to_thread(cluster.shutdown)
                    cluster = build_cluster(self.config)
                    session = await asyncio.to_thread(cluster.connect)
            except (*OUTAGES, cassandra.RequestValidationException) as exc:
                self._last_error = exc
                await asyncio.to_thread(cluster.shutdown)
                if isinstance(exc, cassandra.RequestValidationException):
                    raise translate(exc, op) from exc
                reason = describe_connect_error(self.config, exc, where)
                raise Unavailable(
                    f"cassandra is unavailable for {op}: cannot connect to {where} ({reason})"
                ) from exc
            session.default_fetch_size = FETCH_SIZE
            self._cluster, self._session = cluster, session
            log.info(
                "connected to cassandra at %s (keyspace %r, protocol v%d, consistency %s)",
                where,
                self.keyspace,
                cluster.protocol_version,
                self.config.consistency,
            )

    async def close(self) -> None:
        """Shut the driver down (idempotent); later operations raise Unavailable."""
        self._closed = True
        cluster, self._cluster, self._session = self._cluster, None, None
        self._prepared.clear()
        if cluster is not None:
            try:  # the driver's shutdown can block on a node that stopped answering
                await asyncio.wait_for(asyncio.to_thread(cluster.shutdown), SHUTDOWN_SECONDS)
            except TimeoutError:
                log.warning("cassandra driver did not shut down within %.0f s", SHUTDOWN_SECONDS)

    def qualify(self, cql: str) -> str:
        """``cql`` with ``{ks}`` replaced by the keyspace (tables are always qualified)."""
        return cql.replace("{ks}", self.keyspace)

    async def _prepare(self, cql: str, idempotent: bool) -> PreparedStatement:
        fut = self._prepared.get(cql)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._prepared[cql] = fut
            try:
                prepared = await asyncio.to_thread(self._session.prepare, self.qualify(cql))
                prepared.is_idempotent = idempotent
                fut.set_result(prepared)
            except BaseException as exc:
                del self._prepared[cql]
                if isinstance(exc, asyncio.CancelledError):
                    fut.cancel()
                else:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved here: other waiters see it through await
                raise
        return await fut

    def _bridge(self, response: Any) -> asyncio.Future[list[Row]]:
        """An asyncio future for every row of a driver ResponseFuture, all pages."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[list[Row]] = loop.create_future()
        rows: list[Row] = []

        def on_page(page: Sequence[Row] | None) -> None:
            try:
                rows.extend(page or ())  # None for schema changes and plain writes
                if response.has_more_pages:
                    response.start_fetching_next_page()
                    return
            except Exception as exc:  # never leave the awaiting task hanging
                loop.call_soon_threadsafe(_settle, out, None, exc)
                return
            loop.call_soon_threadsafe(_settle, out, rows, None)

        def on_error(exc: BaseException) -> None:
            loop.call_soon_threadsafe(_settle, out, None, exc)

        response.add_callbacks(on_page, on_error)
        return out

    async def execute(
        self, cql: str, params: Sequence[Any] = (), *, op: str, idempotent: bool = True
    ) -> list[Row]:
        """Run ``cql`` as a prepared statement with ``params``; return every row.

        Table names in ``cql`` are written ``{ks}.table``: Cassandra 5 warns about
        prepared statements that rely on a session keyspace (``USE``).

        ``idempotent`` lets the driver retry the statement on its own; pass False for
        counter updates and lightweight transactions. Raises Unavailable on an outage.
        """
        try:
            await self.connect(op)
            prepared = await self._prepare(cql, idempotent)
            trace = self._traces is not None
            response = self._session.execute_async(prepared, tuple(params), trace=trace)
            rows = await self._bridge(response)
            if self._traces is not None:
                self._traces.append(await asyncio.to_thread(self._trace_events, response))
            return rows
        except RelayError as exc:
            self._failed(exc)
            raise
        except (*OUTAGES, cassandra.RequestValidationException) as exc:
            raise self._failed(translate(exc, op)) from exc

    def _failed(self, error: RelayError) -> RelayError:
        """Tell ``on_error`` of ``error``; return it."""
        if self._on_error is not None:
            self._on_error(error)
        return error

    async def execute_batches(
        self, batches: Iterable[Sequence[Statement]], *, op: str, idempotent: bool = True
    ) -> None:
        """Send each batch (statements on one partition) as one unlogged batch; bounded.

        A batch of one statement is sent as that statement. Raises Unavailable on an
        outage (some batches may have been applied: writes here are idempotent upserts).
        """
        calls: list[Callable[[], Awaitable[object]]] = []
        for batch in batches:
            if len(batch) == 1:
                cql, params = batch[0]
                calls.append(functools.partial(self.execute, cql, params, op=op))
            elif batch:
                calls.append(functools.partial(self._batch, list(batch), op, idempotent))
        await self.bounded(calls)

    async def _batch(self, statements: list[Statement], op: str, idempotent: bool) -> None:
        try:
            await self.connect(op)
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            batch.is_idempotent = idempotent
            for cql, params in statements:
                batch.add(await self._prepare(cql, idempotent), params)
            response = self._session.execute_async(batch, trace=self._traces is not None)
            await self._bridge(response)
            if self._traces is not None:
                self._traces.append(await asyncio.to_thread(self._trace_events, response))
        except RelayError as exc:
            self._failed(exc)
            raise
        except (*OUTAGES, cassandra.RequestValidationException) as exc:
            raise self._failed(translate(exc, op)) from exc

    async def execute_ddl(self, cql: str, *, op: str) -> list[Row]:
        """Run a schema statement (migrations only: DDL is not prepared).

        Unqualified table names resolve in the session keyspace (protocol v5 sends it
        with the statement).
        """
        try:
            await self.connect(op)
            statement = SimpleStatement(cql, keyspace=self.keyspace or None)
            # Schema changes wait for agreement between nodes; never wait forever.
            async with asyncio.timeout(DDL_TIMEOUT_SECONDS):
                return await self._bridge(self._session.execute_async(statement))
        except TimeoutError as exc:
            raise Unavailable(
                f"{op}: no answer within {DDL_TIMEOUT_SECONDS:.0f} s (schema change)"
            ) from exc
        except RelayError:
            raise
        except (*OUTAGES, cassandra.RequestValidationException) as exc:
            raise translate(exc, op) from exc

    async def bounded(self, calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
        """Await every call, at most ``config.write_concurrency`` at once; results in order.

        The bound is shared by every caller of this session, so many concurrent batches
        cannot flood the cluster. On failure the first error is raised after the other
        calls finished (nothing is left running in the background).
        """

        async def one(call: Callable[[], Awaitable[T]]) -> T:
            async with self._writes:
                return await call()

        return await gather_all(*(one(c) for c in calls))

    async def execute_many(
        self,
        statements: Iterable[tuple[str, Sequence[Any]]],
        *,
        op: str,
        idempotent: bool = True,
    ) -> list[list[Row]]:
        """Run many prepared statements concurrently (bounded); their rows, in order."""

        def call(cql: str, params: Sequence[Any]) -> Callable[[], Awaitable[list[Row]]]:
            return lambda: self.execute(cql, params, op=op, idempotent=idempotent)

        return await self.bounded([call(cql, params) for cql, params in statements])

    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[list[str]]]:
        """Trace every statement run inside the block; yields the trace events of each.

        For tests and diagnostics: tracing costs the cluster extra writes.
        """
        traces: list[list[str]] = []
        self._traces = traces
        try:
            yield traces
        finally:
            self._traces = None

    @staticmethod
    def _trace_events(response: Any) -> list[str]:
        traces = response.get_all_query_traces(max_wait_per=TRACE_WAIT_SECONDS)
        return [str(event.description) for trace in traces for event in trace.events]
