"""Composition root of a relay node: wires config, stores, core and servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from relay.clock import Clock, SystemClock
from relay.common.device_events import DeviceEventSource, RedisDeviceEvents
from relay.common.grpcserver import (
    SHUTDOWN_MARGIN_SECONDS,
    GrpcServer,
    bounded_close,
    drain_delay,
)
from relay.common.rpc_metrics import RpcMetrics
from relay.common.tls import check_listen, secure_or_plain_channel, server_credentials
from relay.config import Config, load_or_create_key, relay_key_path
from relay.core.auth import ApiKeys, DeviceAuthenticator, ServiceSender
from relay.core.delivery import Relay
from relay.core.ports import MessageQueue, NodeLinks, Presence
from relay.core.presence_local import LocalPresence, NoLinks
from relay.errors import RelayError
from relay.metrics import RelayMetrics
from relay.model import Address
from relay.server.drain import Drain
from relay.server.identity_keys import GrpcIdentityKeys
from relay.server.links import GrpcNodeLinks, NodeLinkServicer
from relay.server.servicer import RelayServicer
from relay.stores.sqlite_queue import SqliteQueue
from relaypb.node.v1 import node_pb2_grpc
from relaypb.relay.v1 import relay_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "relaypb.relay.v1.Relay"
LINK_SERVICE_NAME = "relaypb.node.v1.NodeLink"
#: How often expired envelopes are purged from the store.
PURGE_INTERVAL_SECONDS = 60.0


def api_keys_from_config(config: Config) -> ApiKeys:
    """The API key table of ``config`` (keys read from their files, kept as digests)."""
    return ApiKeys({k.key_digest(): ServiceSender(k.tenant, k.name) for k in config.api_keys})


class RelayApp:
    """A running relay node. ``async with RelayApp(config) as app:`` serves on ``app.port``.

    With Redis presence (a cluster) it also serves node links on a listener of their
    own, ``node.link_listen`` (``app.link_address``): mutual TLS when ``[tls]`` is set,
    else plaintext on loopback only. The device port never serves node links.

    Device removals come from ``events`` if given (``relayd run``: the key directory in
    the same process shares one LocalDeviceEvents), else from Redis pub/sub when
    ``presence.backend`` is ``redis``; with neither (a lone embedded relay node), a
    removed device's cached key expires after ``keyserver.identity_cache_seconds``.

    ``share_port``: bind the device port with SO_REUSEPORT on purpose, shared with the
    sibling nodes of ``relayd relay --processes N`` (relay.server.processes).

    Its metrics (``self.metrics``, per-RPC series included) go to ``registry`` (the
    process's, which ``relayd`` serves on ``metrics.listen``; default: a registry of its
    own). A process that runs a key directory too passes the same ``rpc_metrics`` to both.
    """

    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        *,
        events: DeviceEventSource | None = None,
        share_port: bool = False,
        registry: CollectorRegistry | None = None,
        rpc_metrics: RpcMetrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._events = events
        self._share_port = share_port
        self.metrics = RelayMetrics(registry)
        self._rpc_metrics = rpc_metrics or RpcMetrics(self.metrics.registry)
        self._stack = contextlib.AsyncExitStack()
        self._server: GrpcServer | None = None
        self._link_server: GrpcServer | None = None
        #: Where peers reach this node's link listener (published in presence).
        self._advertise = ""
        self.relay: Relay | None = None
        self._drain = Drain(config.node.id)

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

    @property
    def link_address(self) -> str:
        """``host:port`` of the node-link listener (after start; only with Redis presence)."""
        if self._link_server is None:
            raise RuntimeError("this node has no link listener (presence.backend is local)")
        return self._link_server.address

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
        queue = await self._open_queue()
        presence = await self._open_presence()
        # Decided before anything listens: plaintext off loopback is refused (or warned).
        device_tls = check_listen("node.listen", cfg.node.listen, cfg.tls)
        channel = secure_or_plain_channel(cfg.keyserver.target, ca_file=cfg.tls.ca_file)
        self._stack.push_async_callback(channel.close)
        identities = GrpcIdentityKeys(
            channel,
            self.clock,
            int(cfg.keyserver.identity_cache_seconds * 1000),
            list_ttl_ms=int(cfg.keyserver.device_list_cache_seconds * 1000),
            relay_key=load_or_create_key(relay_key_path(cfg)),
            metrics=self.metrics,
        )
        links: NodeLinks = NoLinks()
        clustered = cfg.presence.backend == "redis"
        # Decided before anything listens: plaintext links off loopback are refused.
        link_tls = clustered and check_listen("node.link_listen", cfg.node.link_listen, cfg.tls)
        if clustered:
            grpc_links = GrpcNodeLinks(
                cfg.node.id, presence, self.metrics, tls=cfg.tls if link_tls else None
            )
            self._stack.push_async_callback(grpc_links.close)
            links = grpc_links
        self.relay = Relay(
            queue=queue,
            identities=identities,
            clock=self.clock,
            limits=cfg.limits,
            metrics=self.metrics,
            node_id=cfg.node.id,
            presence=presence,
            links=links,
            presence_cache_seconds=cfg.presence.cache_seconds if clustered else 0.0,
        )
        # Listen before serving: no session opens here before removals are heard.
        await self._subscribe_device_events()
        servicer = RelayServicer(
            relay=self.relay,
            authenticator=DeviceAuthenticator(
                identities, self.clock, cfg.node.id, int(cfg.limits.auth_timeout_seconds * 1000)
            ),
            api_keys=api_keys,
            metrics=self.metrics,
            node_id=cfg.node.id,
            auth_timeout_seconds=cfg.limits.auth_timeout_seconds,
            max_inflight_batches=cfg.limits.max_stream_inflight_batches,
            write_stall_seconds=cfg.limits.write_stall_seconds,
        )
        if clustered:
            # Links first: peers can reach this node before presence names it.
            self._link_server = GrpcServer(
                cfg.node.link_listen,
                [
                    (
                        node_pb2_grpc.add_NodeLinkServicer_to_server,
                        NodeLinkServicer(self.relay.peers, authenticated=link_tls),
                        LINK_SERVICE_NAME,
                    )
                ],
                grace_seconds=cfg.node.grace_seconds,
                interceptors=[self._rpc_metrics.interceptor()],
                # One node per port: a second process must not share (and split) it.
                options=[("grpc.so_reuseport", 0)],
                credentials=(
                    server_credentials(cfg.tls, require_client_auth=True) if link_tls else None
                ),
            )
            await self._stack.enter_async_context(self._link_server)
            self._advertise = cfg.node.link_advertise or self._link_server.address
        self._server = GrpcServer(
            cfg.node.listen,
            [(relay_pb2_grpc.add_RelayServicer_to_server, servicer, SERVICE_NAME)],
            grace_seconds=cfg.node.grace_seconds,
            # Shared by --processes siblings (grpcio's default is on too; here it is meant).
            options=[
                ("grpc.max_concurrent_streams", cfg.limits.max_streams_per_connection),
                *([("grpc.so_reuseport", 1)] if self._share_port else []),
            ],
            interceptors=[self._rpc_metrics.interceptor(), self._drain.guard()],
            credentials=(
                server_credentials(cfg.tls, require_client_auth=False) if device_tls else None
            ),
        )
        await self._stack.enter_async_context(self._server)
        if clustered:
            # Announce this node before taking traffic, then keep it and its sessions alive.
            await self._heartbeat(presence)
            self._spawn(self._heartbeat_loop(presence), "heartbeat")
        self._spawn(self._purge_loop(), "purge")
        log.info("relay node %s serving on %s", cfg.node.id, self._server.address)
        if self._link_server is not None:
            log.info(
                "node links on %s (%s), advertised as %s",
                self._link_server.address,
                "mutual TLS" if link_tls else "plaintext, loopback",
                self._advertise,
            )

    async def _subscribe_device_events(self) -> None:
        """Act on device removals announced by the key directory while the node runs."""
        cfg = self.config
        events = self._events
        if events is None and cfg.presence.backend == "redis":
            redis_events = RedisDeviceEvents.from_config(cfg.presence)
            self._stack.push_async_callback(redis_events.close)
            events = redis_events
        if events is not None:
            await self._stack.enter_async_context(events.subscribe(self._device_removed))

    async def _device_removed(self, device: Address) -> None:
        """One removal: the core ends the device's sessions here and purges its queue."""
        assert self.relay is not None
        try:
            purged = await self.relay.device_removed(device)
        except RelayError as exc:
            log.warning(
                "device %s removed: sessions ended, but its queue was not purged (%s); "
                "its envelopes expire with their TTL",
                device,
                exc,
            )
            return
        log.info("device %s removed: sessions ended, %d queued envelopes purged", device, purged)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self._stack.push_async_callback(stop)

    async def _open_queue(self) -> MessageQueue:
        cfg = self.config
        if cfg.storage.backend == "embedded":
            return await self._stack.enter_async_context(
                SqliteQueue(cfg.storage.path / "queue.db", clock=self.clock)
            )
        from relay.common.cassandra.session import CassandraSession  # noqa: PLC0415
        from relay.stores.cassandra.queue import CassandraQueue  # noqa: PLC0415

        session = await self._stack.enter_async_context(
            CassandraSession(cfg.cassandra, on_error=self.metrics.cassandra_error)
        )
        return CassandraQueue(session, self.clock, max_ttl_seconds=cfg.limits.max_ttl_seconds)

    async def _open_presence(self) -> Presence:
        cfg = self.config
        if cfg.presence.backend == "local":
            return LocalPresence()
        from relay.stores.redis_presence import RedisPresence  # noqa: PLC0415

        return await self._stack.enter_async_context(RedisPresence(cfg.presence))

    async def _heartbeat(self, presence: Presence) -> bool:
        assert self.relay is not None
        sessions = [(s.address, s.epoch) for s in self.relay.sessions.all()]
        return await presence.heartbeat(self.config.node.id, self._advertise, sessions)

    async def _heartbeat_loop(self, presence: Presence) -> None:
        """Refresh liveness; after an outage or a loss of Redis data, sessions re-read."""
        assert self.relay is not None
        interval = (
            min(self.config.presence.node_ttl_seconds, self.config.presence.device_ttl_seconds) / 3
        )
        healthy = True
        while True:
            await asyncio.sleep(interval)  # a period, not synchronisation
            try:
                intact = await self._heartbeat(presence)
            except RelayError as exc:
                self.metrics.presence_failures.inc()
                if healthy:
                    log.warning("presence heartbeat failed: %s", exc)
                healthy = False
                continue
            if not intact or not healthy:
                log.info("presence restored; every session re-reads its queue")
                self.relay.router.reread_all()
            healthy = True

    async def _purge_loop(self) -> None:
        """Delete expired envelopes now and then."""
        assert self.relay is not None
        while True:
            try:
                purged = await self.relay.purge_expired()
                if purged:
                    log.info("purged %d expired envelopes", purged)
            except Exception:
                log.exception("purging expired envelopes failed; will retry")
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)  # a period, not synchronisation

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await bounded_close(self._stack, self.config.node.grace_seconds + SHUTDOWN_MARGIN_SECONDS)

    async def drain(self, delay_seconds: float, hurry: asyncio.Event | None = None) -> None:
        """Drain before stopping (see relay.server.drain): NOT_SERVING, then end sessions.

        Health says NOT_SERVING at once on every listener; the node keeps serving for
        ``delay_seconds`` (or until ``hurry`` is set), then ends every device session
        with NODE_DRAINING and refuses new ones. Leaving the ``async with`` then stops
        the servers within ``node.grace_seconds``.
        """
        assert self._server is not None and self.relay is not None
        for server in (self._server, self._link_server):
            if server is not None:
                await server.not_serving()
        await drain_delay(delay_seconds, hurry)
        ended = self._drain.begin(self.relay.sessions)
        log.info(
            "draining: ended %d device sessions with NODE_DRAINING; new sessions are refused",
            ended,
        )

    async def wait(self) -> None:
        """Serve until the server stops."""
        assert self._server is not None
        await self._server.wait()
