"""The composition root of a key directory process: store, core and gRPC server."""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType

from keyserver.client import SERVICE_NAME
from keyserver.directory import DirectoryLimits, KeyDirectory
from keyserver.servicer import KeyDirectoryServicer
from keyserver.sqlite_store import KEYS_DB, SCHEMA, sqlite_key_stores
from relay.clock import Clock, SystemClock
from relay.config import Config, ConfigError
from relay.server.grpcserver import SHUTDOWN_MARGIN_SECONDS, GrpcServer, bounded_close
from relay.stores.sqlite_worker import SqliteWorker
from relaypb.keys.v1 import keys_pb2_grpc

#: Storage backends the key directory can run on today.
BACKENDS = ("embedded", "cassandra")


class KeyserverApp:
    """A running key directory: ``async with KeyserverApp(config) as app: ...``.

    On entry it opens the key store (``embedded``: ``<data_dir>/keys.db``), builds the
    core (time from ``clock``, the system clock by default) and serves it on
    ``config.keyserver.listen``; on exit it stops the server (open calls get
    ``config.node.grace_seconds``), then closes the store.
    """

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        if config.storage.backend not in BACKENDS:
            raise ConfigError(
                f"storage.backend: {config.storage.backend!r} is not supported by the key "
                f"directory yet (supported: {', '.join(BACKENDS)})"
            )
        self._config = config
        self._clock = clock or SystemClock()
        self._stack: AsyncExitStack | None = None
        self._server: GrpcServer | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after entry)."""
        return self._running().port

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after entry)."""
        return self._running().address

    def _running(self) -> GrpcServer:
        if self._server is None:
            raise RuntimeError("KeyserverApp is not running")
        return self._server

    async def __aenter__(self) -> KeyserverApp:
        async with AsyncExitStack() as stack:
            core = await self._open_core(stack)
            server = GrpcServer(
                self._config.keyserver.listen,
                [
                    (
                        keys_pb2_grpc.add_KeyDirectoryServicer_to_server,
                        KeyDirectoryServicer(core),
                        SERVICE_NAME,
                    )
                ],
                grace_seconds=self._config.node.grace_seconds,
            )
            await stack.enter_async_context(server)
            self._server = server
            self._stack = stack.pop_all()
        return self

    async def _open_core(self, stack: AsyncExitStack) -> KeyDirectory:
        """The core on the configured backend (``storage.backend``)."""
        limits = DirectoryLimits(low_water_mark=self._config.keyserver.low_water_mark)
        if self._config.storage.backend == "cassandra":
            from keyserver.cassandra_store import (  # noqa: PLC0415 - optional driver
                cassandra_key_stores,
            )
            from relay.stores.cassandra.session import CassandraSession  # noqa: PLC0415

            session = await stack.enter_async_context(CassandraSession(self._config.cassandra))
            return KeyDirectory(cassandra_key_stores(session), self._clock, limits)
        path = self._config.storage.path / KEYS_DB
        worker = await stack.enter_async_context(SqliteWorker(path, SCHEMA))
        return KeyDirectory(sqlite_key_stores(worker), self._clock, limits)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._server = self._stack, None, None
        if stack is not None:
            await bounded_close(stack, self._config.node.grace_seconds + SHUTDOWN_MARGIN_SECONDS)
