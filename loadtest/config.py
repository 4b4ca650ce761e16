"""The load generator's configuration (one frozen dataclass) and its defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtest.schedule import Schedule, parse_schedule
from loadtest.wire import MIN_PAYLOAD

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_KEYS = "127.0.0.1:50052"
DEFAULT_DEVICES = 100
DEFAULT_CONNECTIONS = 4
DEFAULT_WORKERS = 1
DEFAULT_SCHEDULE = "constant:1000"
DEFAULT_DURATION_S = 10.0
DEFAULT_PAYLOAD_BYTES = 256
DEFAULT_BATCH = 50
DEFAULT_FANOUT = 1
DEFAULT_TENANT = "loadtest"
DEFAULT_INTERVAL_S = 1.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_SETUP_TIMEOUT_S = 300.0
DEFAULT_REGISTER_CONCURRENCY = 64
DEFAULT_CONNECT_CONCURRENCY = 128
DEFAULT_MAX_BACKLOG = 200_000
DEFAULT_SATURATION_RATIO = 0.8
DEFAULT_STOP_P99_MS = 1000.0


class ConfigError(ValueError):
    """An option out of range; the message names the option."""


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Everything one load run needs. Field comments are the ``--help`` texts."""

    #: Relay nodes (host:port); devices are spread over them round-robin.
    targets: tuple[str, ...] = (DEFAULT_TARGET,)
    #: Key directories: one for all targets, or one per target (same order).
    keys: tuple[str, ...] = (DEFAULT_KEYS,)
    #: CA (PEM) verifying the targets' and key directories' TLS certificates; empty:
    #: the system's CAs, and plaintext to loopback (relay.common.tls.secure_or_plain_channel).
    tls_ca: str = ""
    devices: int = DEFAULT_DEVICES
    connections: int = DEFAULT_CONNECTIONS
    workers: int = DEFAULT_WORKERS
    schedule: str = DEFAULT_SCHEDULE
    duration_s: float = DEFAULT_DURATION_S
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES
    batch: int = DEFAULT_BATCH
    fanout: int = DEFAULT_FANOUT
    offline_fraction: float = 0.0
    #: Send only to the offline devices: every envelope is stored, none is delivered live
    #: (the store-and-forward path); steps and saturation are then judged on acknowledged
    #: (STORED) envelopes instead of delivered ones.
    offline_recipients: bool = False
    tenant: str = DEFAULT_TENANT
    interval_s: float = DEFAULT_INTERVAL_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S
    register_concurrency: int = DEFAULT_REGISTER_CONCURRENCY
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY
    max_backlog: int = DEFAULT_MAX_BACKLOG
    stop_on_saturation: bool = False
    saturation_ratio: float = DEFAULT_SATURATION_RATIO
    stop_p99_ms: float = DEFAULT_STOP_P99_MS
    cross_node: bool = False
    #: CPUs the generator's processes are pinned to (empty: not pinned).
    cpus: tuple[int, ...] = ()
    prometheus_port: int = 0
    quiet: bool = False

    def parsed_schedule(self) -> Schedule:
        """The Schedule of ``schedule`` and ``duration_s``."""
        return parse_schedule(self.schedule, self.duration_s)

    def key_target(self, node: int) -> str:
        """The key directory devices homed on ``node`` register with."""
        return self.keys[node] if len(self.keys) > 1 else self.keys[0]

    def node_of(self, device: int) -> int:
        """The target index device ``device`` is homed on (spread across workers too)."""
        return (device // self.workers) % len(self.targets)

    def owner_of(self, device: int) -> int:
        """The worker that holds device ``device``'s stream."""
        return device % self.workers

    def is_offline(self, device: int) -> bool:
        """Whether ``device`` stays offline until the drain (an even spread of the fraction)."""
        f = self.offline_fraction
        return math.floor((device + 1) * f) > math.floor(device * f)

    def progress(self, delivered: float, acked: float) -> float:
        """The count that says whether the target keeps up: delivered, or acknowledged
        when every recipient is offline (``offline_recipients``)."""
        return acked if self.offline_recipients else delivered

    def connections_per_node(self) -> int:
        """Channels (TCP connections) each worker opens to each target."""
        return max(1, math.ceil(self.connections / (self.workers * len(self.targets))))

    def validate(self) -> LoadConfig:
        """Return self, or raise ConfigError naming the bad option."""
        checks = (
            (bool(self.targets), "--target: at least one relay node"),
            (len(self.keys) in (1, len(self.targets)), "--keys: one, or one per --target"),
            (self.devices >= 2, "--devices must be >= 2"),
            (self.connections >= 1, "--connections must be >= 1"),
            (1 <= self.workers <= 64, "--workers must be 1..64"),
            (self.duration_s > 0, "--duration must be > 0"),
            (self.payload_bytes >= MIN_PAYLOAD, f"--payload must be >= {MIN_PAYLOAD} bytes"),
            (1 <= self.batch <= 1000, "--batch must be 1..1000"),
            (1 <= self.fanout <= self.batch, "--fanout must be 1..--batch"),
            (0 <= self.offline_fraction < 1, "--offline-fraction must be in [0, 1)"),
            (self.interval_s > 0, "--interval must be > 0"),
            (self.max_backlog >= self.batch, "--max-backlog must be >= --batch"),
            (0 < self.saturation_ratio <= 1, "--saturation-ratio must be in (0, 1]"),
            (self.stop_p99_ms > 0, "--stop-p99-ms must be > 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        online = [d for d in range(self.devices) if not self.is_offline(d)]
        owners = {self.owner_of(d) for d in online}
        if len(owners) < self.workers:
            raise ConfigError("every worker needs an online device: lower --workers")
        if self.offline_recipients:
            offline_nodes = {self.node_of(d) for d in range(self.devices) if self.is_offline(d)}
            online_nodes = {self.node_of(d) for d in online}
            if self.cross_node:
                offline_nodes = set(range(len(self.targets)))
            if not online_nodes <= offline_nodes:
                raise ConfigError(
                    "--offline-recipients: every node with senders needs offline devices "
                    "(raise --offline-fraction)"
                )
        self.parsed_schedule()
        return self
