"""Prometheus metrics of a key directory, on the registry its process serves.

Labels are bounded: a step, a result (``ok`` or a gRPC status code in lower case); never
a tenant, user or device. Per-RPC counts and latencies come from
``relay.common.rpc_metrics`` (``grpc_server_handled_total{grpc_service=
"relaypb.keys.v1.KeyDirectory"}``); these say what the calls did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter

from relay.errors import RelayError
from relay.metrics import cassandra_error_kind


class KeyserverMetrics:
    """The key directory's counters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registrations = Counter(
            "keyserver_registrations_total",
            "RegisterDevice calls, by result: ok, or the status refusing it "
            "(already_exists, permission_denied, resource_exhausted, ...)",
            ["result"],
            registry=self.registry,
        )
        self.links = Counter(
            "keyserver_links_total",
            "Device-linking steps, by step (request, approve) and result",
            ["step", "result"],
            registry=self.registry,
        )
        self.removals = Counter(
            "keyserver_removals_total",
            "RemoveDevice calls, by result",
            ["result"],
            registry=self.registry,
        )
        self.replenish = Counter(
            "keyserver_prekey_replenish_signals_total",
            "Answers telling a device to upload one-time prekeys: a pool at or below "
            "keyserver.low_water_mark, or no last-resort PQ prekey",
            registry=self.registry,
        )
        self.bundles = Counter(
            "keyserver_prekey_bundles_total",
            "Prekey bundles handed out, by one_time: claimed (with a one-time X25519 "
            "prekey) or none (that device's pool was empty)",
            ["one_time"],
            registry=self.registry,
        )
        self.cassandra_errors = Counter(
            "keyserver_cassandra_errors_total",
            "Cassandra statements of the key directory that failed, by kind: unavailable "
            "(an outage) or rejected (schema, query)",
            ["kind"],
            registry=self.registry,
        )
        self.bundle_claimed = self.bundles.labels("claimed")
        self.bundle_empty = self.bundles.labels("none")

    def cassandra_error(self, error: RelayError) -> None:
        """Count one failed Cassandra statement (``CassandraSession(on_error=...)``)."""
        self.cassandra_errors.labels(cassandra_error_kind(error)).inc()

    @contextmanager
    def outcome(self, counter: Counter, *labels: str) -> Iterator[None]:
        """Count the block in ``counter{labels..., result}``: ``ok``, or how it failed."""
        try:
            yield
        except RelayError as exc:
            counter.labels(*labels, exc.status.name.lower()).inc()
            raise
        except Exception:
            counter.labels(*labels, "internal").inc()
            raise
        counter.labels(*labels, "ok").inc()
