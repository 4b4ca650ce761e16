"""Prometheus metrics of a relay node, on the registry its process serves.

Labels are bounded by design: outcomes, status codes, limit names, peer node ids, cache
names; never a tenant, user or device. Series counted once per envelope are bound to
their children here, once (``copies_direct``...), so the hot path does no label lookup.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.errors import ClientError, RelayError, Unavailable
from relay.model import Outcome


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
        #: ``relay_envelopes_total`` by Outcome, bound once: ``envelope_outcomes[o].inc()``.
        self.envelope_outcomes = {o: self.envelopes.labels(o.name.lower()) for o in Outcome}
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
        self.sessions_receive = self.sessions.labels("receive")
        self.sessions_send = self.sessions.labels("send")
        self.auth_failures = Counter(
            "relay_auth_failures_total", "Failed authentications", registry=self.registry
        )
        self.displaced_total = Counter(
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
        self.link_refused_total = Counter(
            "relay_link_refused_total",
            "Node-link items refused or ignored: peer_identity (certificate names another "
            "node), displace_epoch (not the epoch presence holds), repoll_rate (over budget)",
            ["reason"],
            registry=self.registry,
        )
        self.link_forwards = Counter(
            "relay_link_forwards_total",
            "Envelopes (wake-ups with their envelope) sent to other relay nodes",
            ["peer"],
            registry=self.registry,
        )
        self.link_errors = Counter(
            "relay_link_errors_total",
            "Node links to a peer that failed (connect or stream error); each reconnects",
            ["peer"],
            registry=self.registry,
        )
        self.key_cache = Counter(
            "relay_key_cache_lookups_total",
            "Lookups in the node's cache of the key directory, by cache (identity_key, "
            "device_list) and result (hit; miss: a call to the key directory)",
            ["cache", "result"],
            registry=self.registry,
        )
        self.identity_hit = self.key_cache.labels("identity_key", "hit")
        self.identity_miss = self.key_cache.labels("identity_key", "miss")
        self.device_list_hit = self.key_cache.labels("device_list", "hit")
        self.device_list_miss = self.key_cache.labels("device_list", "miss")
        #: Per-device copies of accepted envelopes by path: ``direct`` (written to an
        #: online session) or ``stored`` (to the device's queue). For the core to count.
        self.copies = Counter(
            "relay_envelope_copies_total",
            "Per-device copies of accepted envelopes, by path: direct (to an online "
            "session) or stored (to the device's queue)",
            ["path"],
            registry=self.registry,
        )
        self.copies_direct = self.copies.labels("direct")
        self.copies_stored = self.copies.labels("stored")
        #: From the accepted send to the copy written on the recipient's stream.
        self.delivery_seconds = Histogram(
            "relay_delivery_seconds",
            "Time from accepting a send to writing the copy on the recipient's stream, by "
            "path (direct: the device was online; stored: read from its queue later)",
            ["path"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0, 3600.0),
        )
        self.delivery_direct = self.delivery_seconds.labels("direct")
        self.delivery_stored = self.delivery_seconds.labels("stored")
        self.cassandra_errors = Counter(
            "relay_cassandra_errors_total",
            "Cassandra statements of the relay node that failed, by kind: unavailable "
            "(an outage: no host, timeouts, overload) or rejected (schema, query)",
            ["kind"],
            registry=self.registry,
        )
        self.presence_failures = Counter(
            "relay_presence_failures_total",
            "Failed presence heartbeats (Redis unreachable)",
            registry=self.registry,
        )
        self.send_latency = Histogram(
            "relay_send_seconds",
            "Time to accept one send batch (durable before ack)",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )

    # -- relay.core.ports.CoreMetrics: what the core counts ------------------------

    def send_seconds(self, seconds: float) -> None:
        """One send took ``seconds``."""
        self.send_latency.observe(seconds)

    def envelope(self, outcome: Outcome, error: ClientError | None) -> None:
        """One envelope answered ``outcome``."""
        self.envelope_outcomes[outcome].inc()
        if error is not None:
            self.rejections.labels(error.status.name, error.metadata.get("limit", "")).inc()

    def copy(self, *, direct: bool) -> None:
        """One copy DELIVERED direct, or STORED."""
        (self.copies_direct if direct else self.copies_stored).inc()

    def session(self, *, receive: bool, opened: bool) -> None:
        """A session opened or closed."""
        gauge = self.sessions_receive if receive else self.sessions_send
        if opened:
            gauge.inc()
        else:
            gauge.dec()

    def displaced(self) -> None:
        """A session was displaced."""
        self.displaced_total.inc()

    def acked(self, removed: int) -> None:
        """An ack removed ``removed`` stored envelopes."""
        self.acks.inc(removed)

    def link_refused(self, reason: str) -> None:
        """A peer's message was refused for ``reason``."""
        self.link_refused_total.labels(reason).inc()

    def cassandra_error(self, error: RelayError) -> None:
        """Count one failed Cassandra statement (``CassandraSession(on_error=...)``)."""
        self.cassandra_errors.labels(cassandra_error_kind(error)).inc()


def cassandra_error_kind(error: RelayError) -> str:
    """``unavailable`` for an outage, ``rejected`` for a statement Cassandra refused."""
    return "unavailable" if isinstance(error, Unavailable) else "rejected"
