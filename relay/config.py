"""Configuration: frozen dataclasses, one per section, loaded once.

A TOML file (``relayd --config FILE``) overrides the defaults below; unknown keys and
wrong types are errors that name the key path (``limits.max_envelope_bytes``).
Secrets are never inline: an API key is read from ``key_file``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_RELAY_LISTEN = "127.0.0.1:50051"
DEFAULT_KEYSERVER_LISTEN = "127.0.0.1:50052"
#: Node links: loopback, a free port per process (peers learn it through presence).
DEFAULT_LINK_LISTEN = "127.0.0.1:0"
DEFAULT_DATA_DIR = "./data"
DEFAULT_MAX_ENVELOPE_BYTES = 256 * 1024
DEFAULT_MAX_QUEUE_DEPTH = 10_000
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024
DEFAULT_TTL_SECONDS = 30 * 24 * 3600
DEFAULT_MAX_BATCH_ENVELOPES = 1000
DEFAULT_AUTH_TIMEOUT_SECONDS = 30.0
DEFAULT_DELIVERY_PAGE = 256
DEFAULT_SESSION_REPOLL_SECONDS = 30.0
DEFAULT_DIRECT_ACK_MS = 100
DEFAULT_MAX_SESSION_INFLIGHT_ENVELOPES = 1024
DEFAULT_MAX_SESSION_INFLIGHT_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_STREAM_INFLIGHT_BATCHES = 32
DEFAULT_IDENTITY_CACHE_SECONDS = 60.0
DEFAULT_GRACE_SECONDS = 5.0
DEFAULT_DRAIN_DELAY_SECONDS = 5.0
DEFAULT_LOW_WATER_MARK = 10
#: Prometheus /metrics of ``relayd run`` and ``relayd relay``, and of ``relayd keyserver``.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_KEYSERVER_METRICS_LISTEN = "127.0.0.1:9465"
#: ``metrics.listen`` values that turn the endpoint off.
METRICS_OFF = ("", "off")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key path."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """This relay node: its id (in challenges and presence) and where it listens.

    ``listen`` serves devices and service senders (``relaypb.relay.v1.Relay``) only.
    Node-to-node links (``relaypb.node.v1.NodeLink``, used with ``presence.backend =
    "redis"``) have a listener of their own, ``link_listen``, never the device port. Its
    default, ``127.0.0.1:0``, is loopback on a free port per process: nodes on one host
    find each other through presence, and several processes per host never share it.
    Nodes on several hosts set a reachable ``link_listen`` (e.g. ``0.0.0.0:50053``)
    with ``[tls]`` configured: the link listener then requires mutual TLS, each node's
    certificate naming its node id (``relayd dev-certs``); without TLS a non-loopback
    ``link_listen`` is refused unless ``tls.allow_plaintext``. ``link_advertise`` is
    the address peers dial, as published in presence (default: the bound
    ``link_listen`` address; set it when listening on ``0.0.0.0``).
    """

    id: str = "relay-1"
    listen: str = DEFAULT_RELAY_LISTEN
    #: Node-link listener (mutual TLS when [tls] is set): see the class docstring.
    link_listen: str = DEFAULT_LINK_LISTEN
    #: Address other relay nodes dial for links (default: the bound link_listen address).
    link_advertise: str = ""
    #: Seconds a stopping server gives open calls to finish (after the drain delay:
    #: the drain's grace period, see docs/operations.md#drain).
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    #: On SIGTERM, seconds the servers keep serving while grpc.health.v1 says
    #: NOT_SERVING (so that load balancers stop routing here) before device sessions
    #: are ended with NODE_DRAINING. A second SIGTERM or SIGINT cuts it short.
    drain_delay_seconds: float = DEFAULT_DRAIN_DELAY_SECONDS


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus ``/metrics`` endpoint of a ``relayd`` process (``[metrics]``).

    On by default, on loopback: ``relayd run`` serves the relay node's and the key
    directory's metrics together on ``listen``, ``relayd relay`` serves the node's there,
    and ``relayd keyserver`` serves the key directory's on ``keyserver_listen`` (another
    port, so both can run on one host). ``""`` or ``"off"`` turns an endpoint off. Each
    process on a host needs its own port. HTTPS when ``[tls]`` has a certificate;
    plaintext off loopback is refused unless ``tls.allow_plaintext``.
    """

    listen: str = DEFAULT_METRICS_LISTEN
    keyserver_listen: str = DEFAULT_KEYSERVER_METRICS_LISTEN

    def endpoint(self, command: str) -> tuple[str, str] | None:
        """``(key path, host:port)`` of ``relayd COMMAND``'s endpoint, or None when off."""
        key, listen = (
            ("metrics.keyserver_listen", self.keyserver_listen)
            if command == "keyserver"
            else ("metrics.listen", self.listen)
        )
        if listen.strip().lower() in METRICS_OFF:
            return None
        return key, listen


REGISTRATION_POLICIES = ("open", "token", "closed")
#: File name of the relay nodes' key to the key directory, in ``storage.data_dir``,
#: when ``keyserver.relay_key_file`` is not set.
DEFAULT_RELAY_KEY_NAME = "relay-node.key"


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant's registration policy (``[[keyserver.tenants]]``).

    ``registration``: ``open`` (first come), ``token`` (a registration token signed by
    the tenant signing key whose public half, 64 hex digits, is in
    ``token_public_key_file``; see ``relayd gen-tenant-key``) or ``closed``.
    """

    name: str
    registration: str = "open"
    token_public_key_file: str = ""

    def __post_init__(self) -> None:
        if self.registration not in REGISTRATION_POLICIES:
            raise ConfigError(
                f"keyserver.tenants[{self.name}].registration: {self.registration!r} is "
                f"unknown (known: {', '.join(REGISTRATION_POLICIES)})"
            )
        if self.registration == "token" and not self.token_public_key_file:
            raise ConfigError(
                f"keyserver.tenants[{self.name}].token_public_key_file: a token policy needs "
                "the tenant signing key's public half"
            )

    def token_key(self) -> bytes | None:
        """The tenant signing key's public half (32 bytes), for a token policy."""
        if self.registration != "token":
            return None
        path = f"keyserver.tenants[{self.name}].token_public_key_file"
        try:
            text = Path(self.token_public_key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        try:
            key = bytes.fromhex(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not 64 hex digits") from exc
        if len(key) != 32:
            raise ConfigError(f"{path}: not 64 hex digits (an Ed25519 public key)")
        return key


@dataclass(frozen=True, slots=True)
class KeyserverConfig:
    """Where the key directory listens, where relay nodes reach it, and its prekey signal."""

    listen: str = DEFAULT_KEYSERVER_LISTEN
    target: str = DEFAULT_KEYSERVER_LISTEN
    #: Seconds a relay node caches a device's identity key (and a miss, for a tenth of it).
    identity_cache_seconds: float = DEFAULT_IDENTITY_CACHE_SECONDS
    #: Seconds a relay node caches a user's device list for Sesame checks. 0 (the
    #: default): read it from the key directory at every checked send, so a new device
    #: gets the next message and a removed one none. Raising it trades that for fewer
    #: key-directory reads: within the window a new device can miss messages.
    device_list_cache_seconds: float = 0.0
    #: A device whose one-time X25519 or PQ prekey pool holds at most this many keys is
    #: told to replenish (PrekeyStatus.replenish in PublishPrekeys and CountOneTimePrekeys).
    low_water_mark: int = DEFAULT_LOW_WATER_MARK
    #: Registration policy of tenants not listed in ``tenants`` (open, token, closed).
    #: ``open`` suits the quick start; a production deployment sets ``token``/``closed``.
    default_registration: str = "open"
    tenants: tuple[TenantConfig, ...] = ()
    #: File with the key relay nodes present to the key directory for their reads (both
    #: sides read it). Empty: ``<storage.data_dir>/relay-node.key``, made on first start.
    relay_key_file: str = ""
    #: How long a link request waits for approval, and how many may wait per user.
    link_ttl_seconds: float = 600.0
    max_pending_links_per_user: int = 3
    #: Signed requests one device may make per minute.
    max_signed_requests_per_device: int = 600
    #: Prekey bundles one requester may fetch per minute, and of one device per hour.
    max_bundle_fetches_per_requester: int = 120
    max_bundle_fetches_per_target: int = 10

    def __post_init__(self) -> None:
        if self.default_registration not in ("open", "closed"):
            raise ConfigError(
                f"keyserver.default_registration: {self.default_registration!r} is not open "
                "or closed (a token policy needs a tenant signing key: list the tenant under "
                "[[keyserver.tenants]])"
            )


def relay_key_path(config: Config) -> Path:
    """Where the relay nodes' key to the key directory is kept."""
    if config.keyserver.relay_key_file:
        return Path(config.keyserver.relay_key_file)
    return config.storage.path / DEFAULT_RELAY_KEY_NAME


def load_or_create_key(path: Path) -> str:
    """The secret in ``path``; if there is no such file, a new random one written there (0600).

    Both services call it with the same path; whichever starts first makes the key.
    """
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_key(path)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key
    except OSError as exc:
        raise ConfigError(f"keyserver.relay_key_file: {path}: {exc}") from exc
    if len(text) < 32:
        raise ConfigError(f"keyserver.relay_key_file: {path} holds fewer than 32 characters")
    return text


STORAGE_BACKENDS = ("embedded", "cassandra")
PRESENCE_BACKENDS = ("local", "redis")
CONSISTENCY_LEVELS = ("ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL")
#: Write consistencies that one replica (or, for ANY, a hint) satisfies: a send answered
#: after such a write is lost with that one node's disk.
WEAK_WRITE_CONSISTENCY = ("ONE", "LOCAL_ONE", "ANY")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Which backend stores queues and keys.

    ``embedded``: SQLite files in ``data_dir`` (one process, no servers).
    ``cassandra``: the ``[cassandra]`` section (several stateless relay nodes).
    """

    backend: str = "embedded"
    data_dir: str = DEFAULT_DATA_DIR

    def __post_init__(self) -> None:
        if self.backend not in STORAGE_BACKENDS:
            raise ConfigError(
                f"storage.backend: {self.backend!r} is unknown "
                f"(known: {', '.join(STORAGE_BACKENDS)})"
            )

    @property
    def path(self) -> Path:
        """``data_dir`` as a Path."""
        return Path(self.data_dir)


@dataclass(frozen=True, slots=True)
class CassandraConfig:
    """The Cassandra cluster behind ``storage.backend = "cassandra"``."""

    contact_points: tuple[str, ...] = ("127.0.0.1",)
    port: int = 9042
    keyspace: str = "relay"
    local_dc: str = "datacenter1"
    #: Consistency of reads and writes; LOCAL_QUORUM keeps "durable before ack" honest.
    consistency: str = "LOCAL_QUORUM"
    #: Accept ONE / LOCAL_ONE for the writes that answer a send (refused otherwise).
    allow_weak_write_consistency: bool = False
    #: Replication factor used by ``relayd migrate`` when it creates the keyspace.
    replication_factor: int = 1
    username: str = ""
    #: File holding the password (never inline).
    password_file: str = ""
    request_timeout_seconds: float = 5.0
    #: Concurrent statements per batch of writes.
    write_concurrency: int = 64
    #: TLS to the cluster, on when set: the PEM CA that verifies the nodes' certificates.
    ssl_ca_file: str = ""
    #: Client certificate and key (PEM) for a cluster that asks for one; both or neither.
    ssl_cert_file: str = ""
    ssl_key_file: str = ""
    #: Check that a node's certificate names the address it was reached by (IP or DNS).
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.consistency == "ANY":
            raise ConfigError(
                "cassandra.consistency: 'ANY' acknowledges a write that only a hint holds, and "
                "reads cannot use it; use LOCAL_QUORUM (the default)"
            )
        if self.consistency not in CONSISTENCY_LEVELS:
            raise ConfigError(
                f"cassandra.consistency: {self.consistency!r} is unknown "
                f"(known: {', '.join(CONSISTENCY_LEVELS)})"
            )
        if self.consistency in WEAK_WRITE_CONSISTENCY and not self.allow_weak_write_consistency:
            raise ConfigError(
                f"cassandra.consistency: {self.consistency!r} acknowledges a send once one "
                "replica has it, so losing that node loses acknowledged messages; use "
                "LOCAL_QUORUM (the default), or set "
                "cassandra.allow_weak_write_consistency = true to accept that risk"
            )
        if bool(self.ssl_cert_file) != bool(self.ssl_key_file):
            raise ConfigError(
                "cassandra.ssl_cert_file, cassandra.ssl_key_file: a client certificate "
                "needs both (or neither)"
            )
        if self.ssl_cert_file and not self.ssl_ca_file:
            raise ConfigError(
                "cassandra.ssl_ca_file: TLS is on only with a CA file; set it to use "
                "cassandra.ssl_cert_file"
            )


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    """Where devices are online. ``local``: this process only; ``redis``: the cluster."""

    backend: str = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every Redis key (several clusters may share one Redis).
    key_prefix: str = "relay:"
    #: Lifetime of a device's presence entry; the node refreshes it at a third of this.
    device_ttl_seconds: float = 30.0
    #: Lifetime of a node's liveness key; a dead node's devices count as offline after it.
    node_ttl_seconds: float = 10.0
    #: How long a node caches where a device is.
    cache_seconds: float = 1.0
    #: For a ``rediss://`` URL (TLS): the PEM CA that verifies Redis (empty: the system
    #: roots) and an optional client certificate and key (both or neither).
    redis_ca_file: str = ""
    redis_cert_file: str = ""
    redis_key_file: str = ""

    def __post_init__(self) -> None:
        if self.backend not in PRESENCE_BACKENDS:
            raise ConfigError(
                f"presence.backend: {self.backend!r} is unknown "
                f"(known: {', '.join(PRESENCE_BACKENDS)})"
            )
        if bool(self.redis_cert_file) != bool(self.redis_key_file):
            raise ConfigError(
                "presence.redis_cert_file, presence.redis_key_file: a client certificate "
                "needs both (or neither)"
            )
        tls_files = {
            "redis_ca_file": self.redis_ca_file,
            "redis_cert_file": self.redis_cert_file,
        }
        for name, value in tls_files.items():
            if value and not self.redis_url.startswith("rediss://"):
                raise ConfigError(
                    f"presence.{name}: used only with TLS, but presence.redis_url is not "
                    "a rediss:// URL"
                )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Limits the relay enforces; each is named in the RESOURCE_EXHAUSTED error it causes."""

    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    default_ttl_seconds: int = DEFAULT_TTL_SECONDS
    max_ttl_seconds: int = DEFAULT_TTL_SECONDS
    max_batch_envelopes: int = DEFAULT_MAX_BATCH_ENVELOPES
    auth_timeout_seconds: float = DEFAULT_AUTH_TIMEOUT_SECONDS
    #: Envelopes per Deliver frame, and per store read.
    delivery_page: int = DEFAULT_DELIVERY_PAGE
    #: A receiving session re-reads its queue this often as a safety net for wake-ups
    #: lost between nodes (a lost wake-up delays a stored envelope, never loses it).
    session_repoll_seconds: float = DEFAULT_SESSION_REPOLL_SECONDS
    #: Direct path: how long a send waits for an online recipient's ack before the
    #: envelope is stored instead (answer DELIVERED within it, STORED after). 0 turns the
    #: direct path off (every envelope is stored before it is pushed).
    direct_ack_ms: int = DEFAULT_DIRECT_ACK_MS
    #: Envelopes (and their bytes) a receiving session holds for its device, pushed and
    #: not yet acked; past either, sends to it take the store path and it reads them
    #: from its queue when it catches up (a slow reader cannot grow the relay).
    max_session_inflight_envelopes: int = DEFAULT_MAX_SESSION_INFLIGHT_ENVELOPES
    max_session_inflight_bytes: int = DEFAULT_MAX_SESSION_INFLIGHT_BYTES
    #: SendBatch frames one stream may have unanswered at once (pipelining); the relay
    #: reads no further frames of that stream until one is answered.
    max_stream_inflight_batches: int = DEFAULT_MAX_STREAM_INFLIGHT_BATCHES
    #: A stream whose Deliver write has not gone out for this long (the device stopped
    #: reading) is ended with DEADLINE_EXCEEDED; what it held is in its queue or stored.
    write_stall_seconds: float = 30.0
    #: Concurrent streams (device sessions) one client connection may open (HTTP/2
    #: SETTINGS_MAX_CONCURRENT_STREAMS); past it the client's new streams wait.
    max_streams_per_connection: int = 1000
    #: Devices a user may have at once (the key directory refuses a link past it).
    max_devices_per_user: int = 32

    def __post_init__(self) -> None:
        if self.direct_ack_ms < 0:
            raise ConfigError("limits.direct_ack_ms must be >= 0 (0 turns the direct path off)")
        for name in (
            "max_session_inflight_envelopes",
            "max_session_inflight_bytes",
            "max_stream_inflight_batches",
            "max_streams_per_connection",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1")
        if self.write_stall_seconds <= 0:
            raise ConfigError("limits.write_stall_seconds must be > 0")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS of this process's servers and the servers it calls (``[tls]``).

    ``cert_file``/``key_file``: the PEM certificate chain and key every listener of
    this process serves (relay device port, node links, key directory). With
    ``client_ca_file`` the node-link listener requires client certificates signed by it
    (mutual TLS). ``ca_file``: the CA that verifies the servers this process calls (the
    key directory, peer nodes); empty means the system roots. Binding a non-loopback
    address without TLS is refused unless ``allow_plaintext`` says it is deliberate.
    Files are read again when they change (and on SIGHUP).
    """

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    ca_file: str = ""
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls: cert_file and key_file go together (both, or neither)")

    @property
    def enabled(self) -> bool:
        """Whether this process serves TLS."""
        return bool(self.cert_file)


#: Shortest API key accepted: 32 characters, as 32 random bytes make at least 43
#: (``relayd gen-api-key`` writes ``secrets.token_urlsafe(32)``).
MIN_API_KEY_CHARS = 32


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """A tenant API key for server-side senders. The key itself is read from ``key_file``.

    A key is a bearer secret: at least MIN_API_KEY_CHARS characters of randomness
    (``relayd gen-api-key`` makes one), accepted only over TLS or loopback.
    """

    tenant: str
    name: str
    key_file: str

    def key_digest(self) -> bytes:
        """SHA-256 of the key in ``key_file`` (surrounding whitespace stripped)."""
        try:
            key = Path(self.key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"api_keys[{self.name}].key_file: {exc}") from exc
        if len(key) < MIN_API_KEY_CHARS:
            raise ConfigError(
                f"api_keys[{self.name}].key_file: the key in {self.key_file} is shorter than "
                f"{MIN_API_KEY_CHARS} characters; make one of 32 random bytes with "
                "`relayd gen-api-key`"
            )
        return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of a ``relayd`` process."""

    node: NodeConfig = field(default_factory=NodeConfig)
    keyserver: KeyserverConfig = field(default_factory=KeyserverConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    api_keys: tuple[ApiKeyConfig, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


C = TypeVar("C")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is types.UnionType:
        raise ConfigError(f"{path}: unsupported type")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    if tp in (int, float) and value < 0:
        raise ConfigError(f"{path}: must not be negative, got {value}")
    return value


def from_dict(cls: type[C], data: dict[str, Any], path: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, naming the key path in every error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"{key_path}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], key_path)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load the configuration from ``path`` (or defaults) with dotted-key ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    node = data.get("node")
    if isinstance(node, dict) and "metrics_listen" in node:
        raise ConfigError(
            "node.metrics_listen: moved to metrics.listen (default "
            f'{DEFAULT_METRICS_LISTEN}; "off" turns the endpoint off)'
        )
    return from_dict(Config, data)
