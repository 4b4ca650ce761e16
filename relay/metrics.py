"""Prometheus metrics of a relay node, on a registry of its own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RelayMetrics:
    """The relay node's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.envelopes = Counter(
            "relay_envelopes_total",
            "Envelopes sent to the relay, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "relay_rejections_total",
            "Envelopes rejected, by gRPC status and limit",
            ["status", "limit"],
            registry=self.registry,
        )
        self.delivered = Counter(
            "relay_delivered_envelopes_total",
            "Envelopes written to device streams",
            registry=self.registry,
        )
        self.acks = Counter(
            "relay_acked_envelopes_total",
            "Envelopes acknowledged by devices and removed from their queues",
            registry=self.registry,
        )
        self.sessions = Gauge(
            "relay_sessions", "Open device sessions", ["kind"], registry=self.registry
        )
        self.auth_failures = Counter(
            "relay_auth_failures_total", "Failed authentications", registry=self.registry
        )
        self.displaced = Counter(
            "relay_sessions_displaced_total",
            "Sessions ended by a newer session of the same device",
            registry=self.registry,
        )
        self.link_batches = Counter(
            "relay_link_batches_total",
            "Batches sent to other relay nodes",
            ["peer"],
            registry=self.registry,
        )
        self.link_dropped = Counter(
            "relay_link_dropped_total",
            "Wake-ups to other nodes dropped (full buffer, broken link); envelopes stay stored",
            ["peer"],
            registry=self.registry,
        )
        self.link_refused = Counter(
            "relay_link_refused_total",
            "Node-link items refused or ignored: peer_identity (certificate names another "
            "node), displace_epoch (not the epoch presence holds), repoll_rate (over budget)",
            ["reason"],
            registry=self.registry,
        )
        self.presence_failures = Counter(
            "relay_presence_failures_total",
            "Failed presence heartbeats (Redis unreachable)",
            registry=self.registry,
        )
        self.send_seconds = Histogram(
            "relay_send_seconds",
            "Time to accept one send batch (durable before ack)",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
