"""``relayd``: run the relay node and/or the key directory.

relayd run         relay node + key directory in one process (the embedded default)
relayd relay       a relay node only (--processes N: N nodes on one port, supervised)
relayd keyserver   the key directory only
relayd config      print the effective configuration
relayd migrate     apply the Cassandra schema migrations
relayd gen-tenant-key PREFIX   make a tenant signing key for registration tokens
relayd mint-token  mint a registration token (what a tenant's backend does)
relayd gen-api-key make a tenant API key and print its [[api_keys]] stanza
relayd dev-certs DIR   make a local CA and TLS certificates for every hop (not production)

SIGHUP makes a running relayd read its TLS certificate and key files again. SIGTERM
drains: health NOT_SERVING for node.drain_delay_seconds, then device sessions end with
NODE_DRAINING, then the servers stop within node.grace_seconds (docs/operations.md#drain).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from relay.cli.output import quiet_broken_pipe, version_text
from relay.common import logs
from relay.config import Config, ConfigError, load

log = logging.getLogger("relayd")
#: Random bytes of a key made by ``relayd gen-api-key``.
API_KEY_BYTES = 32


def _process_count(text: str) -> int:
    """``--processes``: a count of at least 1, or ``auto`` (one per usable core)."""
    if text == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of at least 1 or 'auto'")
    return int(text)


def _add_process_flags(cmd: argparse.ArgumentParser) -> None:
    """``relayd relay --processes N`` (relay.server.processes) and its children's flags."""
    cmd.add_argument(
        "--processes",
        type=_process_count,
        default=1,
        metavar="N",
        help="run N relay nodes sharing the --listen port (SO_REUSEPORT), one per core: "
        "nodes <node-id>-0 .. <node-id>-(N-1), each with link and metrics ports moved "
        "up by its index, restarted if one dies; 'auto': one per core (default 1: this "
        "process is the node). Needs Cassandra storage and Redis presence, and no [tls] "
        "(a node certificate names one node id)",
    )
    # Set by the supervisor for its children only.
    cmd.add_argument("--process-index", type=int, help=argparse.SUPPRESS)
    cmd.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Run the end-to-end-encrypted relay node and key directory.",
        epilog="Without --config every setting has its default; see docs/operations.md.",
    )
    parser.add_argument("--version", action="version", version=version_text("relayd"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "relay node and key directory in one process (embedded storage by default)"),
        ("relay", "a relay node only (needs a key directory at keyserver.target)"),
        ("keyserver", "the key directory only"),
        ("config", "print the effective configuration as JSON and exit"),
        ("migrate", "create the Cassandra keyspace and apply pending schema migrations"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        if name == "migrate":
            cmd.add_argument(
                "--status", action="store_true", help="list applied and pending migrations only"
            )
        if name == "relay":
            _add_process_flags(cmd)
        cmd.add_argument("--config", type=Path, help="TOML configuration file")
        cmd.add_argument("--data-dir", help="directory of the embedded SQLite files (./data)")
        cmd.add_argument("--listen", help="relay listen address host:port (127.0.0.1:50051)")
        cmd.add_argument(
            "--keys-listen", help="key directory listen address host:port (127.0.0.1:50052)"
        )
        cmd.add_argument(
            "--keys-target", help="where relay nodes reach the key directory (host:port)"
        )
        cmd.add_argument("--node-id", help="this relay node's id (relay-1)")
        cmd.add_argument(
            "--metrics-listen",
            metavar="HOST:PORT|off",
            help="Prometheus /metrics of this process: metrics.listen (127.0.0.1:9464), or "
            "for `keyserver` metrics.keyserver_listen (127.0.0.1:9465); 'off' turns it off",
        )
        cmd.add_argument(
            "--link-advertise",
            help="node.link_advertise: where peers dial this node's link listener (host:port), "
            "e.g. the pod's own IP in Kubernetes",
        )
        cmd.add_argument(
            "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        cmd.add_argument(
            "--log-format",
            default="text",
            choices=["text", "json"],
            help="log lines on stderr: text (default) or one JSON object a line; both "
            "carry the request id of the call they serve",
        )
        cmd.add_argument(
            "--drain-delay",
            type=float,
            metavar="S",
            help="node.drain_delay_seconds: after SIGTERM, seconds of NOT_SERVING before "
            "device sessions are ended (5)",
        )
    gen = sub.add_parser(
        "gen-tenant-key",
        help="make a tenant signing key for registration tokens (PREFIX.key, PREFIX.pub)",
        description="Make a tenant signing key: PREFIX.key (private: the tenant's backend "
        "mints tokens with it) and PREFIX.pub (for keyserver.tenants.token_public_key_file).",
    )
    gen.add_argument("prefix", type=Path, metavar="PREFIX", help="path prefix, e.g. ./acme")
    gen.add_argument("--tenant", default="TENANT", help="tenant name for the config stanza")
    mint = sub.add_parser(
        "mint-token",
        help="mint a registration token for one user (a tenant backend's job)",
        description="Print a registration token letting one device claim USER in TENANT "
        "(`relayctl init USER --token T`).",
    )
    mint.add_argument("--tenant-key", type=Path, required=True, help="PREFIX.key file")
    mint.add_argument("--tenant", required=True, help="the tenant")
    mint.add_argument("--user", required=True, help="the user the token is for")
    mint.add_argument(
        "--ttl", type=int, default=600, metavar="S", help="seconds it stays valid (600)"
    )
    mint.add_argument(
        "--reset", action="store_true", help="a token to reset the user's account instead"
    )
    api = sub.add_parser(
        "gen-api-key",
        help="make a tenant API key (32 random bytes) and print its [[api_keys]] stanza",
        description="Make a tenant API key for a server-side sender: the unary Send, and "
        "reads of the tenant from the key directory. Printed (or written, 0600, to --out) "
        "with the config stanza; the servers keep only its SHA-256. It is accepted only "
        "over TLS or loopback.",
    )
    api.add_argument("--tenant", required=True, help="the tenant the key sends for")
    api.add_argument("--name", required=True, help="the service's name (user service:NAME)")
    api.add_argument("--out", type=Path, metavar="FILE", help="write the key to FILE (0600)")
    certs = sub.add_parser(
        "dev-certs",
        help="make a local CA and TLS certificates for every hop (tests, quick start)",
        description="Write a local CA (ca.pem) and certificates signed by it to DIR: one "
        "per relay node (node-ID.pem, naming the node id, for links), the key directory "
        "(keys.pem), a client (client.pem) and each --service. For development, tests "
        "and the helm chart's self-signed mode, never production. Prints the [tls] stanza.",
    )
    certs.add_argument("dir", type=Path, metavar="DIR", help="directory to write to")
    nodes = certs.add_mutually_exclusive_group()
    nodes.add_argument(
        "--nodes", type=int, metavar="N", help="certificates for nodes relay-1 .. relay-N"
    )
    nodes.add_argument(
        "--node-id",
        action="append",
        metavar="ID",
        help="a certificate for node ID; repeat (default: relay-1)",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="H",
        help="another DNS name or IP address the certificates name (localhost, 127.0.0.1 "
        "and ::1 always); repeat",
    )
    certs.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="a certificate for service NAME, e.g. redis, cassandra; repeat",
    )
    certs.add_argument("--days", type=int, help="validity in days (default 30)")
    return parser


def run_gen_api_key(args: argparse.Namespace) -> int:
    """``relayd gen-api-key``: a new key, printed or written, and its config stanza."""
    key = secrets.token_urlsafe(API_KEY_BYTES)
    if args.out is None:
        print(key)
        key_file = "/path/to/this-key-file"
        print("# put the key above in a file of its own (mode 0600), then:", file=sys.stderr)
    else:
        key_file = str(args.out)
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            print(f"relayd gen-api-key: {exc}", file=sys.stderr)
            return 1
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        print(f"# wrote the key to {args.out} (0600); config of relay nodes and key directory:")
    print("[[api_keys]]")
    print(f"tenant = {json.dumps(args.tenant)}")
    print(f"name = {json.dumps(args.name)}")
    print(f"key_file = {json.dumps(key_file)}")
    return 0


def run_dev_certs(args: argparse.Namespace) -> int:
    """``relayd dev-certs DIR``: a local CA and certificates, then the [tls] stanza."""
    from relay.common.devcerts import DEFAULT_DAYS, make_dev_certs  # noqa: PLC0415

    if args.nodes is not None:
        node_ids = [f"relay-{i}" for i in range(1, args.nodes + 1)]
    else:
        node_ids = args.node_id or ["relay-1"]
    try:
        made = make_dev_certs(
            args.dir,
            node_ids=node_ids,
            hosts=args.host,
            services=args.service,
            days=args.days or DEFAULT_DAYS,
        )
    except (OSError, ValueError) as exc:
        print(f"relayd dev-certs: {exc}", file=sys.stderr)
        return 1
    print(f"# wrote a CA and certificates to {made.directory} (for development only)")
    print(f"# clients: relayctl --tls-ca {made.ca}   (or RELAY_TLS_CA={made.ca})")
    for node, files in made.nodes.items():
        print(f"# relay node {node} (and relayd run):")
        print("[tls]")
        print(f"cert_file = {json.dumps(str(files.cert))}")
        print(f"key_file = {json.dumps(str(files.key))}")
        print(f"client_ca_file = {json.dumps(str(made.ca))}  # node links: mutual TLS")
        print(f"ca_file = {json.dumps(str(made.ca))}  # verifies the key directory and peers")
    if made.keys is not None:
        print("# the key directory on its own (relayd keyserver):")
        print("[tls]")
        print(f"cert_file = {json.dumps(str(made.keys.cert))}")
        print(f"key_file = {json.dumps(str(made.keys.key))}")
    for name, files in made.services.items():
        print(f"# service {name}: {files.cert}, {files.key}")
    return 0


def run_token_tool(args: argparse.Namespace) -> int:
    """``relayd gen-tenant-key`` and ``relayd mint-token``."""
    from keyserver import tokens  # noqa: PLC0415
    from relay.clock import SystemClock  # noqa: PLC0415

    try:
        if args.command == "gen-tenant-key":
            private, public = tokens.write_tenant_key(args.prefix)
            print(f"wrote {private} (keep it on the tenant's backend) and {public}")
            print("key directory config:")
            print("[[keyserver.tenants]]")
            print(f'name = "{args.tenant}"')
            print('registration = "token"')
            print(f'token_public_key_file = "{public}"')
            return 0
        key = tokens.read_tenant_key(args.tenant_key)
        purpose = "reset" if args.reset else "register"
        print(
            tokens.mint(
                key,
                args.tenant,
                args.user,
                now_ms=SystemClock().now_ms(),
                ttl_seconds=args.ttl,
                purpose=purpose,
            )
        )
    except (OSError, ValueError) as exc:
        print(f"relayd {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the configuration file and apply command-line overrides."""
    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["storage.data_dir"] = args.data_dir
    if args.listen:
        overrides["node.listen"] = args.listen
    if args.node_id:
        overrides["node.id"] = args.node_id
    if args.link_advertise:
        overrides["node.link_advertise"] = args.link_advertise
    if args.keys_listen:
        overrides["keyserver.listen"] = args.keys_listen
        if args.command == "run" and not args.keys_target:
            overrides["keyserver.target"] = args.keys_listen
    if args.keys_target:
        overrides["keyserver.target"] = args.keys_target
    if args.drain_delay is not None:
        overrides["node.drain_delay_seconds"] = args.drain_delay
    if getattr(args, "metrics_listen", None) is not None:
        key = "metrics.keyserver_listen" if args.command == "keyserver" else "metrics.listen"
        overrides[key] = args.metrics_listen
    return load(args.config, overrides)


def _reload_tls() -> None:
    """SIGHUP: every TLS server of this process reads its files at its next handshake."""
    from relay.common.tls import reload_all  # noqa: PLC0415

    reload_all()
    log.info("SIGHUP: TLS certificates and keys are read again at the next handshake")


class _StopSignals:
    """The first SIGTERM or SIGINT starts the shutdown; any later one hurries it.

    SIGTERM (what Kubernetes and systemd send) drains with ``node.drain_delay_seconds``
    of NOT_SERVING first; SIGINT (Ctrl-C) drains without the delay.
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.first: signal.Signals | None = None

    def received(self, sig: signal.Signals) -> None:
        """Signal handler."""
        if self.first is None:
            self.first = sig
            self.stop.set()
        else:
            self.hurry.set()

    def delay(self, config: Config) -> float:
        """Seconds of NOT_SERVING before sessions are ended."""
        return config.node.drain_delay_seconds if self.first == signal.SIGTERM else 0.0


async def serve(config: Config, command: str, *, share_port: bool = False) -> None:
    """Run the servers ``command`` names until SIGINT or SIGTERM, then drain and stop.

    ``share_port``: the relay node binds ``node.listen`` with SO_REUSEPORT, shared with
    its siblings of ``relayd relay --processes N``.
    """
    from keyserver.app import KeyserverApp  # noqa: PLC0415 - only what is run is imported
    from relay.common.device_events import LocalDeviceEvents  # noqa: PLC0415
    from relay.common.metrics_http import MetricsEndpoint, process_registry  # noqa: PLC0415
    from relay.common.rpc_metrics import RpcMetrics  # noqa: PLC0415
    from relay.server import gctune  # noqa: PLC0415
    from relay.server.app import RelayApp  # noqa: PLC0415

    gc_settings = gctune.from_env()  # a bad RELAY_GC fails before anything starts
    signals = _StopSignals()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.received, sig)
    loop.add_signal_handler(signal.SIGHUP, _reload_tls)
    # Both in one process (``run``): removals reach the relay node in-process, unless
    # presence is in Redis, where both use Redis pub/sub (other relay nodes hear it too).
    local = command == "run" and config.presence.backend != "redis"
    events = LocalDeviceEvents() if local else None
    drains: list[Callable[[float, asyncio.Event], Awaitable[None]]] = []
    # One registry and one endpoint for the process: ``run`` serves both services' series.
    registry = process_registry()
    rpc = RpcMetrics(registry)
    async with contextlib.AsyncExitStack() as stack:
        endpoint = config.metrics.endpoint(command)
        if endpoint is not None:  # first: a taken port fails before any gRPC port opens
            await stack.enter_async_context(MetricsEndpoint(*endpoint, registry, config.tls))
        if command in ("run", "keyserver"):
            keys = await stack.enter_async_context(
                KeyserverApp(config, events=events, registry=registry, rpc_metrics=rpc)
            )
            drains.append(keys.drain)
            log.info("key directory listening on %s", keys.address)
        if command in ("run", "relay"):
            node = await stack.enter_async_context(
                RelayApp(
                    config,
                    events=events,
                    share_port=share_port,
                    registry=registry,
                    rpc_metrics=rpc,
                )
            )
            drains.append(node.drain)
            log.info("relay node %s listening on %s", config.node.id, node.address)
        log.info("ready (storage: %s at %s)", config.storage.backend, config.storage.data_dir)
        gctune.apply(gc_settings)  # after start-up: see relay/server/gctune.py
        await signals.stop.wait()
        delay = signals.delay(config)
        log.info(
            "%s: draining: health says NOT_SERVING; device sessions end in %.1f s "
            "(a second signal ends them now)",
            signals.first.name if signals.first else "stop",
            delay,
        )
        await asyncio.gather(*(drain(delay, signals.hurry) for drain in drains))
        log.info("stopping: letting open calls finish for up to %.0f s", config.node.grace_seconds)


async def run_migrate(config: Config, *, status_only: bool) -> int:
    """``relayd migrate``: apply (or list) the versioned CQL migrations."""
    from relay.errors import RelayError  # noqa: PLC0415
    from relay.stores.cassandra import migrate  # noqa: PLC0415

    cass = config.cassandra
    where = f"keyspace {cass.keyspace} at {','.join(cass.contact_points)}:{cass.port}"
    try:
        if not status_only:
            applied = await migrate.migrate(cass)
            print(f"applied {len(applied)} migration(s) to {where}: {', '.join(applied) or '-'}")
        print(migrate.format_status(await migrate.status(cass)))
    except RelayError as exc:
        print(f"relayd migrate: {exc.message}", file=sys.stderr)
        return 1
    return 0


@quiet_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``relayd``."""
    args = _parser().parse_args(argv)
    if args.command in ("gen-tenant-key", "mint-token"):
        return run_token_tool(args)
    if args.command == "gen-api-key":
        return run_gen_api_key(args)
    if args.command == "dev-certs":
        return run_dev_certs(args)
    logs.configure(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    if args.command == "migrate":
        return asyncio.run(run_migrate(config, status_only=args.status))
    share_port = False
    if args.command == "relay" and (args.processes > 1 or args.process_index is not None):
        from relay.server import processes  # noqa: PLC0415

        try:
            processes.check_shareable(config, args.processes)
            if args.process_index is None:  # the supervisor: it serves nothing itself
                argv = list(sys.argv[1:] if argv is None else argv)
                return asyncio.run(processes.supervise(config, argv, args.processes))
            if args.supervisor_pid is not None:
                processes.die_with_parent(args.supervisor_pid)
            config = processes.node_config(config, args.process_index)
        except ConfigError as exc:
            print(f"relayd: configuration error: {exc}", file=sys.stderr)
            return 2
        share_port = True
    try:
        import uvloop  # noqa: PLC0415

        uvloop.run(serve(config, args.command, share_port=share_port))
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
