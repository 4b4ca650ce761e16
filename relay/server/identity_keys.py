"""IdentityKeys over gRPC to the key directory, cached per node.

Positive answers are cached for ``ttl_ms``; misses for a tenth of that, so a device
that registers is usable within seconds. Concurrent lookups of one device share a call.
Lookups are counted in ``relay_key_cache_lookups_total{cache,result}``: a ``miss`` is a
call to the key directory (device lists with ``list_ttl_ms`` 0 are never cached, so
every lookup of one is a miss).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import grpc

from keyserver.client import bearer_metadata
from relay.clock import Clock
from relay.common.convert import address_to_pb
from relay.errors import Unavailable
from relay.metrics import RelayMetrics
from relay.model import Address, registration_id
from relaypb.keys.v1 import keys_pb2, keys_pb2_grpc

#: Most cached entries; the cache is cleared when it grows past this.
MAX_CACHE = 200_000


class GrpcIdentityKeys:
    """Looks up device identity keys in the key directory at ``channel``."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        clock: Clock,
        ttl_ms: int,
        *,
        list_ttl_ms: int = 0,
        relay_key: str = "",
        metrics: RelayMetrics | None = None,
    ) -> None:
        metrics = metrics or RelayMetrics()
        self._identity_hit = metrics.identity_hit
        self._identity_miss = metrics.identity_miss
        self._list_hit = metrics.device_list_hit
        self._list_miss = metrics.device_list_miss
        self._stub = keys_pb2_grpc.KeyDirectoryStub(channel)
        #: The relay nodes' bearer key: every read of the key directory is authenticated.
        self._metadata = bearer_metadata(relay_key) if relay_key else ()
        self._clock = clock
        self._ttl = ttl_ms
        self._list_ttl = list_ttl_ms
        self._cache: dict[Address, tuple[bytes | None, int]] = {}
        self._inflight: dict[Address, asyncio.Future[bytes | None]] = {}
        self._lists: dict[tuple[str, str], tuple[Mapping[int, int], int]] = {}

    async def identity_key(self, device: Address) -> bytes | None:
        """The device's Ed25519 identity key, or None if it is not registered."""
        now = self._clock.now_ms()
        hit = self._cache.get(device)
        if hit is not None and hit[1] > now:
            self._identity_hit.inc()
            return hit[0]
        pending = self._inflight.get(device)
        if pending is not None:
            self._identity_hit.inc()  # shares the call in flight: no call of its own
            return await asyncio.shield(pending)
        self._identity_miss.inc()
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._inflight[device] = fut
        try:
            key = await self._fetch(device)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._inflight[device]
        fut.set_result(key)
        if len(self._cache) >= MAX_CACHE:
            self._cache.clear()
        self._cache[device] = (key, now + (self._ttl if key else self._ttl // 10))
        return key

    def forget(self, device: Address) -> None:
        """Drop what is cached of ``device`` and its user's list (it was removed)."""
        self._cache.pop(device, None)
        self._lists.pop((device.tenant, device.user), None)

    async def devices(self, tenant: str, user: str, *, fresh: bool = False) -> Mapping[int, int]:
        """The user's registered devices (number -> registration id).

        Cached for ``list_ttl_ms`` (0: not cached, read at every call).
        """
        now = self._clock.now_ms()
        hit = self._lists.get((tenant, user))
        if hit is not None and hit[1] > now and not fresh:
            self._list_hit.inc()
            return hit[0]
        self._list_miss.inc()
        request = keys_pb2.ListDevicesRequest(tenant=tenant, user=user)
        try:
            reply = await self._stub.ListDevices(request, timeout=5.0, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return {}
            raise Unavailable(
                f"key directory unreachable while listing the devices of {tenant}/{user}: "
                f"{exc.code().name} {exc.details()}"
            ) from exc
        devices = {d.address.device: registration_id(d.identity_key) for d in reply.devices}
        if self._list_ttl > 0:
            if len(self._lists) >= MAX_CACHE:
                self._lists.clear()
            self._lists[(tenant, user)] = (devices, now + self._list_ttl)
        return devices

    async def _fetch(self, device: Address) -> bytes | None:
        request = keys_pb2.GetIdentityKeyRequest(device=address_to_pb(device))
        try:
            reply = await self._stub.GetIdentityKey(request, timeout=5.0, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise Unavailable(
                f"key directory unreachable while checking {device}: {exc.code().name} "
                f"{exc.details()}"
            ) from exc
        return reply.identity_key or None
