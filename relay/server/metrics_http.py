"""The Prometheus ``/metrics`` endpoint of a relay node, over TLS when ``[tls]`` is set."""

from __future__ import annotations

import ssl
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from relay.common.tls import follow_files
from relay.config import TlsConfig


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
