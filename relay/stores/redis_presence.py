"""Presence in Redis: device -> (node, epoch) with a TTL, plus a liveness key per node.

Keys (``{p}`` is ``presence.key_prefix``, ``relay:`` by default):

- ``{p}presence:<tenant>/<user>/<device>``: hash ``node``, ``epoch``; expires after
  ``presence.device_ttl_seconds`` unless the node's heartbeat refreshes it. A release
  drops ``node`` only: the epoch stays until the key expires, so the next claim's
  epoch is larger even from a clock that is behind.
- ``{p}node:<node id>``: where other nodes reach the node's link listener
  (``node.link_advertise``, by default the bound ``node.link_listen``); expires after
  ``presence.node_ttl_seconds``, so a dead node's devices count as offline at once.

Redis only answers where a device is; envelopes never pass through it. Every multi-step
update is a Lua script (atomic); lookups are pipelined. Where a device is online is
cached for ``presence.cache_seconds``; "offline" is never cached.

A ``rediss://`` URL is TLS, verified with ``presence.redis_ca_file`` (the system roots
if empty), presenting ``presence.redis_cert_file`` if set; a failed handshake is an
``Unavailable`` that says which certificate did not verify (``relay.common.store_tls``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.common.store_tls import describe_redis_error, redis_client_kwargs, redis_where
from relay.config import PresenceConfig
from relay.errors import Unavailable
from relay.model import Address, Location
from relay.resource import AsyncResource

# Returns {previous node or false, previous epoch, new epoch} (epochs as decimal strings).
CLAIM = """
local prev_node = redis.call('HGET', KEYS[1], 'node')
local prev_epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local epoch = math.max(prev_epoch + 1, tonumber(ARGV[2]))
local e = string.format('%.0f', epoch)
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', e)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {prev_node, string.format('%.0f', prev_epoch), e}
"""

# Drops the node but keeps the epoch (until the key's TTL), so that a claim right after
# a release still gets a larger epoch even from a clock that is behind.
RELEASE = """
if redis.call('HGET', KEYS[1], 'node') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'epoch') == ARGV[2] then
  return redis.call('HDEL', KEYS[1], 'node')
end
return 0
"""

# Refresh our entry; re-create it if it vanished; leave a newer session's entry alone.
REFRESH = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur and tonumber(cur) > tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if cur then return 0 end
return 1
"""


def _key(prefix: str, device: Address) -> str:
    return f"{prefix}presence:{device.tenant}/{device.user}/{device.device}"


class RedisPresence(AsyncResource):
    """The Presence protocol on Redis (see ``relay.core.ports.Presence``)."""

    def __init__(self, config: PresenceConfig) -> None:
        self._cfg = config
        self._prefix = config.key_prefix
        self._where = redis_where(config)
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            config.redis_url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            **redis_client_kwargs(config),
        )
        self._claim = self._redis.register_script(CLAIM)
        self._release = self._redis.register_script(RELEASE)
        self._refresh = self._redis.register_script(REFRESH)
        self._cache: dict[Address, tuple[Location, float]] = {}
        self._device_ttl_ms = int(config.device_ttl_seconds * 1000)
        self._node_ttl_ms = int(config.node_ttl_seconds * 1000)

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._redis.aclose()

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            reason = describe_redis_error(self._cfg, exc, self._where)
            raise Unavailable(
                f"presence store (Redis at {self._where}) failed to {what}: {reason}"
            ) from exc

    async def claim(
        self, device: Address, node_id: str, now_ms: int
    ) -> tuple[int, Location | None]:
        """See ``Presence.claim``."""
        prev_node, prev_epoch, epoch = await self._call(
            f"claim {device}",
            self._claim(
                keys=[_key(self._prefix, device)],
                args=[node_id, now_ms * 1000, self._device_ttl_ms],
            ),
        )
        self._cache.pop(device, None)
        previous = Location(prev_node.decode(), int(prev_epoch)) if prev_node else None
        return int(epoch), previous

    async def release(self, device: Address, node_id: str, epoch: int) -> None:
        """See ``Presence.release``."""
        self._cache.pop(device, None)
        await self._call(
            f"release {device}",
            self._release(keys=[_key(self._prefix, device)], args=[node_id, str(epoch)]),
        )

    async def locate(self, devices: Sequence[Address]) -> dict[Address, Location]:
        """See ``Presence.locate``: one pipeline for the devices, one for their nodes."""
        now = time.monotonic()
        found: dict[Address, Location] = {}
        missing: list[Address] = []
        for device in devices:
            hit = self._cache.get(device)
            if hit is not None and hit[1] > now:
                found[device] = hit[0]
            else:
                missing.append(device)
        if not missing:
            return found
        pipe = self._redis.pipeline(transaction=False)
        for device in missing:
            pipe.hmget(_key(self._prefix, device), "node", "epoch")
        rows = await self._call("locate devices", pipe.execute())
        candidates = {
            device: Location(node.decode(), int(epoch))
            for device, (node, epoch) in zip(missing, rows, strict=True)
            if node is not None and epoch is not None
        }
        nodes = sorted({loc.node_id for loc in candidates.values()})
        if nodes:
            alive = await self._call(
                "check node liveness",
                self._redis.mget([f"{self._prefix}node:{n}" for n in nodes]),
            )
            live = {n for n, addr in zip(nodes, alive, strict=True) if addr is not None}
            until = now + self._cfg.cache_seconds
            for device, loc in candidates.items():
                if loc.node_id in live:
                    found[device] = loc
                    self._cache[device] = (loc, until)
        if len(self._cache) > 100_000:
            self._cache.clear()
        return found

    async def current(self, device: Address) -> Location | None:
        """See ``Presence.current``: one HMGET, bypassing (and not filling) the cache."""
        node, epoch = await self._call(
            f"read the entry of {device}",
            self._redis.hmget(_key(self._prefix, device), "node", "epoch"),
        )
        if node is None or epoch is None:
            return None
        return Location(node.decode(), int(epoch))

    async def heartbeat(
        self, node_id: str, advertise: str, sessions: Sequence[tuple[Address, int]]
    ) -> bool:
        """See ``Presence.heartbeat``: returns False if Redis had lost this node's key."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(f"{self._prefix}node:{node_id}", advertise, px=self._node_ttl_ms, get=True)
        for device, epoch in sessions:
            await self._refresh(  # only queues it on the pipeline; execute() runs it
                keys=[_key(self._prefix, device)],
                args=[node_id, str(epoch), self._device_ttl_ms],
                client=pipe,
            )
        results = await self._call("heartbeat", pipe.execute())
        return results[0] is not None

    async def node_address(self, node_id: str) -> str | None:
        """See ``Presence.node_address``."""
        value = await self._call(
            f"look up node {node_id}", self._redis.get(f"{self._prefix}node:{node_id}")
        )
        return value.decode() if value is not None else None
