"""Device events from the key directory to relay nodes (today: a device was removed).

Two carriers, one shape (``keyserver.ports.DeviceEvents`` to publish,
:class:`DeviceEventSource` to listen):

- :class:`LocalDeviceEvents`: in one process (``relayd run``: relay and key directory
  together on the embedded default).
- :class:`RedisDeviceEvents`: Redis pub/sub on ``{presence.key_prefix}device-removed``,
  for a cluster (every relay node listens; every key directory process publishes).

A ``rediss://`` URL is TLS with the ``presence.redis_*_file`` settings (build it with
:meth:`RedisDeviceEvents.from_config`); Redis failures are logged with the reason
spelled out (a certificate that did not verify says so).

Pub/sub is fire and forget: a relay node that is cut off from Redis at that moment
misses the event. What it then still holds expires on its own: the identity-key cache
after ``keyserver.identity_cache_seconds``, and the device's signed requests and reads
are refused by the key directory at once. Events carry addresses only, no keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from relay.authproof import parse_address
from relay.common.store_tls import describe_redis_error, redis_client_kwargs, redis_where
from relay.config import PresenceConfig
from relay.model import Address

log = logging.getLogger(__name__)

Listener = Callable[[Address], Awaitable[None]]
#: The pub/sub channel, after ``presence.key_prefix``.
REMOVED_CHANNEL = "device-removed"


class DeviceEventSource(Protocol):
    """What a relay node listens to (both carriers below are one)."""

    def subscribe(self, listener: Listener) -> contextlib.AbstractAsyncContextManager[None]:
        """Call ``listener`` for every removal while the returned context is open."""
        ...


class LocalDeviceEvents:
    """Device events within one process: publishers call listeners directly."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    async def device_removed(self, device: Address) -> None:
        """Tell every listener that ``device`` was removed (a failing listener is logged)."""
        for listener in list(self._listeners):
            try:
                await listener(device)
            except Exception:
                log.exception("device-removed listener failed for %s", device)

    @contextlib.asynccontextmanager
    async def subscribe(self, listener: Listener) -> AsyncIterator[None]:
        """Call ``listener`` for every removal while the context is open."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)


class RedisDeviceEvents:
    """Device events over Redis pub/sub (see the module docstring)."""

    def __init__(
        self, redis_url: str, key_prefix: str, *, presence: PresenceConfig | None = None
    ) -> None:
        """Publish and listen on ``redis_url``; TLS settings from ``presence`` if given.

        ``presence`` supplies ``redis_ca_file``/``redis_cert_file``/``redis_key_file``
        for a ``rediss://`` URL (without it, the system roots verify the server).
        """
        import redis.asyncio as aioredis  # noqa: PLC0415 - Redis is optional (cluster extra)

        self._config = dataclasses.replace(
            presence or PresenceConfig(), redis_url=redis_url, key_prefix=key_prefix
        )
        self._where = redis_where(self._config)
        self._redis = aioredis.Redis.from_url(redis_url, **redis_client_kwargs(self._config))
        self._channel = f"{key_prefix}{REMOVED_CHANNEL}"

    @classmethod
    def from_config(cls, presence: PresenceConfig) -> RedisDeviceEvents:
        """Device events on ``presence.redis_url`` with its TLS settings."""
        return cls(presence.redis_url, presence.key_prefix, presence=presence)

    def _describe(self, exc: BaseException) -> str:
        return f"Redis at {self._where}: {describe_redis_error(self._config, exc, self._where)}"

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    async def device_removed(self, device: Address) -> None:
        """Publish the removal of ``device``; a Redis failure is logged, not raised."""
        from redis.exceptions import RedisError  # noqa: PLC0415

        try:
            await self._redis.publish(self._channel, str(device))
        except RedisError as exc:
            log.warning("could not announce the removal of %s: %s", device, self._describe(exc))

    @contextlib.asynccontextmanager
    async def subscribe(self, listener: Listener) -> AsyncIterator[None]:
        """Call ``listener`` for every removal announced while the context is open.

        Subscribed before the context body runs; reconnects with a pause after a Redis
        failure (removals announced meanwhile are missed, see the module docstring).
        """
        ready = asyncio.Event()
        task = asyncio.create_task(self._listen(listener, ready), name="device events")
        try:
            await asyncio.wait_for(ready.wait(), timeout=10)
        except TimeoutError:
            log.warning("device events: not subscribed yet; going on without waiting")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self, listener: Listener, ready: asyncio.Event) -> None:
        from redis.exceptions import RedisError  # noqa: PLC0415

        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        await self._deliver(listener, message.get("data"))
            except RedisError as exc:
                log.warning("device events: %s; resubscribing", self._describe(exc))
                await asyncio.sleep(1.0)  # a pause before reconnecting, not synchronisation

    @staticmethod
    async def _deliver(listener: Listener, data: object) -> None:
        try:
            text = data.decode() if isinstance(data, bytes) else str(data)
            device = parse_address(text)
        except (ValueError, UnicodeDecodeError):
            log.warning("device events: ignored a malformed message")
            return
        try:
            await listener(device)
        except Exception:
            log.exception("device-removed listener failed for %s", device)
