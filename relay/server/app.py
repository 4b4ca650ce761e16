"""Composition root of a relay node: wires config, stores, core and servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import grpc

from relay.clock import Clock, SystemClock
from relay.config import Config, ConfigError
from relay.core.auth import ApiKeys, DeviceAuthenticator, ServiceSender
from relay.core.delivery import Relay
from relay.metrics import RelayMetrics
from relay.server.grpcserver import GrpcServer
from relay.server.identity_keys import GrpcIdentityKeys
from relay.server.servicer import RelayServicer
from relay.stores.sqlite_queue import SqliteQueue
from relaypb.relay.v1 import relay_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "relaypb.relay.v1.Relay"
#: How often expired envelopes are purged from the store.
PURGE_INTERVAL_SECONDS = 60.0


def api_keys_from_config(config: Config) -> ApiKeys:
    """The API key table of ``config`` (keys read from their files, kept as digests)."""
    return ApiKeys({k.key_digest(): ServiceSender(k.tenant, k.name) for k in config.api_keys})


class RelayApp:
    """A running relay node. ``async with RelayApp(config) as app:`` serves on ``app.port``."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        if config.storage.backend != "embedded":
            raise ConfigError(
                f"storage.backend: {config.storage.backend!r} is not available yet "
                "(known: 'embedded')"
            )
        self.config = config
        self.clock = clock or SystemClock()
        self.metrics = RelayMetrics()
        self._stack = contextlib.AsyncExitStack()
        self._server: GrpcServer | None = None
        self._purger: asyncio.Task[None] | None = None
        self.relay: Relay | None = None

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        assert self._server is not None
        return self._server.port

    @property
    def address(self) -> str:
        """``host:port`` bound (after start)."""
        assert self._server is not None
        return self._server.address

    async def __aenter__(self) -> RelayApp:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.config
        api_keys = api_keys_from_config(cfg)
        queue = await self._stack.enter_async_context(SqliteQueue(cfg.storage.path / "queue.db"))
        channel = grpc.aio.insecure_channel(cfg.keyserver.target)
        self._stack.push_async_callback(channel.close)
        identities = GrpcIdentityKeys(
            channel, self.clock, int(cfg.keyserver.identity_cache_seconds * 1000)
        )
        self.relay = Relay(
            queue=queue,
            identities=identities,
            clock=self.clock,
            limits=cfg.limits,
            metrics=self.metrics,
        )
        servicer = RelayServicer(
            relay=self.relay,
            authenticator=DeviceAuthenticator(
                identities, self.clock, cfg.node.id, int(cfg.limits.auth_timeout_seconds * 1000)
            ),
            api_keys=api_keys,
            metrics=self.metrics,
            node_id=cfg.node.id,
            auth_timeout_seconds=cfg.limits.auth_timeout_seconds,
        )
        self._server = GrpcServer(
            cfg.node.listen,
            [(relay_pb2_grpc.add_RelayServicer_to_server, servicer, SERVICE_NAME)],
            grace_seconds=cfg.node.grace_seconds,
        )
        await self._stack.enter_async_context(self._server)
        self._purger = asyncio.create_task(self._purge_loop())
        self._stack.push_async_callback(self._stop_purger)
        log.info("relay node %s serving on %s", cfg.node.id, self._server.address)

    async def _purge_loop(self) -> None:
        assert self.relay is not None
        while True:
            try:
                purged = await self.relay.purge_expired()
                if purged:
                    log.info("purged %d expired envelopes", purged)
            except Exception:
                log.exception("purging expired envelopes failed; will retry")
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)  # a period, not synchronisation

    async def _stop_purger(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def wait(self) -> None:
        """Serve until the server stops."""
        assert self._server is not None
        await self._server.wait()
