"""The Prometheus ``/metrics`` endpoint of a ``relayd`` process, over TLS when ``[tls]`` is set.

One endpoint per process (``relayd run`` serves the relay node's and the key directory's
series together), on a registry of its own that also holds prometheus_client's process,
platform and garbage-collector collectors.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.registry import CollectorRegistry

from relay.common.tls import check_listen, follow_files
from relay.config import TlsConfig

log = logging.getLogger(__name__)


def process_registry() -> CollectorRegistry:
    """A new registry with the process, platform and GC collectors of prometheus_client.

    It also turns off the ``*_created`` series of the metrics made after it, process-wide
    (a prometheus_client setting): they double the series and no dashboard reads them.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def start_metrics_server(
    listen: str, registry: CollectorRegistry, tls: TlsConfig | None
) -> WSGIServer:
    """Serve ``registry`` on ``listen`` (``host:port``) from a thread of its own.

    With ``tls`` it serves HTTPS with ``tls.cert_file``/``key_file``, read again when they
    change or on :func:`relay.common.tls.reload_all`, like the gRPC servers. The caller
    stops it with ``shutdown()`` and ``server_close()``.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if tls is None:
        server, _thread = start_http_server(int(port), host, registry=registry)
        return server
    server, _thread = start_http_server(
        int(port), host, registry=registry, certfile=tls.cert_file, keyfile=tls.key_file
    )
    sock = server.socket
    assert isinstance(sock, ssl.SSLSocket)
    follow_files(sock.context, tls)
    return server


class MetricsEndpoint:
    """``async with MetricsEndpoint("metrics.listen", listen, registry, tls):`` serves /metrics.

    ``key`` is the configuration key ``listen`` came from, named in errors. On entry it
    refuses plaintext off loopback (unless ``tls.allow_plaintext``) and binds, raising
    OSError that names the key when the address is taken; on exit it stops serving.
    """

    def __init__(self, key: str, listen: str, registry: CollectorRegistry, tls: TlsConfig) -> None:
        self._key = key
        self._listen = listen
        self._registry = registry
        self._tls = tls
        self._server: WSGIServer | None = None

    @property
    def port(self) -> int:
        """The bound port (after entry)."""
        assert self._server is not None
        return int(self._server.server_port)

    async def __aenter__(self) -> MetricsEndpoint:
        secure = check_listen(self._key, self._listen, self._tls)
        try:
            self._server = start_metrics_server(
                self._listen, self._registry, self._tls if secure else None
            )
        except ValueError as exc:
            raise OSError(f"{self._key}: {self._listen!r} is not host:port") from exc
        except OSError as exc:
            raise OSError(
                f"{self._key}: cannot serve metrics on {self._listen} ({exc.strerror or exc}); "
                f'another process may hold it: give each process its own port, or "off"'
            ) from exc
        log.info(
            "metrics on %s://%s/metrics",
            "https" if secure else "http",
            self._listen.rsplit(":", 1)[0] + f":{self.port}",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for the serving thread's next poll (up to 0.5 s).
            await asyncio.to_thread(server.shutdown)
            server.server_close()
