"""An optional Prometheus endpoint (127.0.0.1) showing a run while it goes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class PromExporter:
    """Counters and gauges of the run, updated at every completed interval."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sent = Counter("loadtest_sent_envelopes", "Envelopes sent", registry=r)
        self.acked = Counter("loadtest_acked_envelopes", "Envelopes acknowledged", registry=r)
        self.delivered = Counter("loadtest_delivered_envelopes", "Envelopes delivered", registry=r)
        self.errors = Counter("loadtest_errors", "Errors by status code", ["code"], registry=r)
        self.offered_rate = Gauge(
            "loadtest_offered_rate", "Envelopes/s the schedule asks for", registry=r
        )
        self.latency = Gauge(
            "loadtest_latency_seconds",
            "Latency percentile of the last interval",
            ["quantile"],
            registry=r,
        )
        self.server, self.thread = start_http_server(port, addr=host, registry=r)

    def update(
        self,
        *,
        offered_rate: float,
        sent: int,
        acked: int,
        delivered: int,
        errors: dict[str, int],
        percentiles_ms: dict[str, float],
    ) -> None:
        """Add one interval's counts and set its percentiles."""
        self.offered_rate.set(offered_rate)
        self.sent.inc(sent)
        self.acked.inc(acked)
        self.delivered.inc(delivered)
        for code, n in errors.items():
            self.errors.labels(code).inc(n)
        for name, ms in percentiles_ms.items():
            self.latency.labels(name).set(ms / 1000)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
