"""The composition root of a key directory process: store, core and gRPC server."""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import AsyncExitStack
from types import TracebackType

from prometheus_client import CollectorRegistry

from keyserver.client import SERVICE_NAME
from keyserver.directory import (
    DirectoryLimits,
    KeyDirectory,
    Policies,
    RegistrationPolicy,
)
from keyserver.metrics import KeyserverMetrics
from keyserver.model import Reader
from keyserver.ports import DeviceEvents, KeyStores
from keyserver.servicer import KeyDirectoryServicer
from keyserver.sqlite_store import KEYS_DB, SCHEMA, sqlite_key_stores
from relay.clock import Clock, SystemClock
from relay.common.grpcserver import (
    SHUTDOWN_MARGIN_SECONDS,
    GrpcServer,
    bounded_close,
    drain_delay,
)
from relay.common.rpc_metrics import RpcMetrics
from relay.common.sqlite_worker import SqliteWorker
from relay.common.tls import check_listen, server_credentials
from relay.config import Config, ConfigError, load_or_create_key, relay_key_path
from relaypb.keys.v1 import keys_pb2_grpc

#: Storage backends the key directory can run on today.
BACKENDS = ("embedded", "cassandra")


class KeyserverApp:
    """A running key directory: ``async with KeyserverApp(config) as app: ...``.

    On entry it opens the key store (``embedded``: ``<data_dir>/keys.db``), builds the
    core (time from ``clock``, the system clock by default) and serves it on
    ``config.keyserver.listen``, over TLS when ``[tls]`` has a certificate (plaintext
    only on loopback, or with ``tls.allow_plaintext``); on exit it stops the server
    (open calls get ``config.node.grace_seconds``), then closes the store.

    Its metrics (``self.metrics``, per-RPC series included) go to ``registry`` (the
    process's, which ``relayd`` serves; default: a registry of its own). A process that
    runs a relay node too passes the same ``rpc_metrics`` to both.
    """

    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        *,
        events: DeviceEvents | None = None,
        registry: CollectorRegistry | None = None,
        rpc_metrics: RpcMetrics | None = None,
    ) -> None:
        if config.storage.backend not in BACKENDS:
            raise ConfigError(
                f"storage.backend: {config.storage.backend!r} is not supported by the key "
                f"directory yet (supported: {', '.join(BACKENDS)})"
            )
        self._config = config
        self._clock = clock or SystemClock()
        self._events = events
        self.metrics = KeyserverMetrics(registry)
        self._rpc_metrics = rpc_metrics or RpcMetrics(self.metrics.registry)
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
        listen = self._config.keyserver.listen
        # Before anything opens: plaintext off loopback is refused (or warned).
        credentials = (
            server_credentials(self._config.tls, require_client_auth=False)
            if check_listen("keyserver.listen", listen, self._config.tls)
            else None
        )
        async with AsyncExitStack() as stack:
            stores = await self._open_stores(stack)
            events = self._events
            if events is None and self._config.presence.backend == "redis":
                from relay.common.device_events import (  # noqa: PLC0415 - optional Redis
                    RedisDeviceEvents,
                )

                redis_events = RedisDeviceEvents.from_config(self._config.presence)
                stack.push_async_callback(redis_events.close)
                events = redis_events
            limits = directory_limits(self._config)
            core = KeyDirectory(
                stores,
                self._clock,
                limits,
                policies=policies(self._config),
                bearer_keys=bearer_keys(self._config),
                events=events,
            )
            servicer = KeyDirectoryServicer(core, self.metrics)
            server = GrpcServer(
                listen,
                [(keys_pb2_grpc.add_KeyDirectoryServicer_to_server, servicer, SERVICE_NAME)],
                grace_seconds=self._config.node.grace_seconds,
                credentials=credentials,
                interceptors=[self._rpc_metrics.interceptor()],
            )
            await stack.enter_async_context(server)
            self._server = server
            self._stack = stack.pop_all()
        return self

    async def drain(self, delay_seconds: float, hurry: asyncio.Event | None = None) -> None:
        """Before stopping (SIGTERM): health says NOT_SERVING, serving goes on a while.

        Returns after ``delay_seconds`` (or once ``hurry`` is set), so that load
        balancers stop routing here first; leaving the ``async with`` then stops the
        server, open calls getting ``node.grace_seconds``.
        """
        await self._running().not_serving()
        await drain_delay(delay_seconds, hurry)

    async def _open_stores(self, stack: AsyncExitStack) -> KeyStores:
        """The key stores on the configured backend (``storage.backend``)."""
        if self._config.storage.backend == "cassandra":
            from keyserver.cassandra_store import (  # noqa: PLC0415 - optional driver
                cassandra_key_stores,
            )
            from relay.common.cassandra.session import CassandraSession  # noqa: PLC0415

            session = await stack.enter_async_context(
                CassandraSession(self._config.cassandra, on_error=self.metrics.cassandra_error)
            )
            return cassandra_key_stores(session)
        path = self._config.storage.path / KEYS_DB
        worker = await stack.enter_async_context(SqliteWorker(path, SCHEMA))
        return sqlite_key_stores(worker)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._server = self._stack, None, None
        if stack is not None:
            await bounded_close(stack, self._config.node.grace_seconds + SHUTDOWN_MARGIN_SECONDS)


def directory_limits(config: Config) -> DirectoryLimits:
    """The key directory limits of ``config``."""
    ks = config.keyserver
    return DirectoryLimits(
        low_water_mark=ks.low_water_mark,
        max_signed_requests_per_device=ks.max_signed_requests_per_device,
        max_bundle_fetches_per_requester=ks.max_bundle_fetches_per_requester,
        max_bundle_fetches_per_target=ks.max_bundle_fetches_per_target,
        max_devices_per_user=config.limits.max_devices_per_user,
        max_pending_links_per_user=ks.max_pending_links_per_user,
        link_ttl_ms=int(ks.link_ttl_seconds * 1000),
    )


def policies(config: Config) -> Policies:
    """The registration policy of every tenant of ``config`` (token keys read from files)."""
    ks = config.keyserver
    return Policies(
        default=RegistrationPolicy(ks.default_registration),
        tenants=tuple(
            (t.name, RegistrationPolicy(t.registration, t.token_key())) for t in ks.tenants
        ),
    )


def bearer_keys(config: Config) -> dict[bytes, Reader]:
    """Who may read with a bearer key: the relay nodes (every tenant), tenant services."""
    keys = {
        k.key_digest(): Reader(f"service {k.tenant}/{k.name}", k.tenant) for k in config.api_keys
    }
    relay_key = load_or_create_key(relay_key_path(config))
    keys[hashlib.sha256(relay_key.encode()).digest()] = Reader("relay nodes", None, relay_node=True)
    return keys
