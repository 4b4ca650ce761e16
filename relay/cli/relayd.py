"""``relayd``: run the relay node and/or the key directory.

relayd run         relay node + key directory in one process (the embedded default)
relayd relay       a relay node only
relayd keyserver   the key directory only
relayd config      print the effective configuration
relayd migrate     apply the Cassandra schema migrations
relayd gen-tenant-key PREFIX   make a tenant signing key for registration tokens
relayd mint-token  mint a registration token (what a tenant's backend does)
relayd gen-api-key make a tenant API key and print its [[api_keys]] stanza
relayd dev-certs DIR   make a local CA and TLS certificates for every hop (not production)

SIGHUP makes a running relayd read its TLS certificate and key files again.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.config import Config, ConfigError, load

log = logging.getLogger("relayd")
#: Random bytes of a key made by ``relayd gen-api-key``.
API_KEY_BYTES = 32


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Run the end-to-end-encrypted relay node and key directory.",
        epilog="Without --config every setting has its default; see docs/operations.md.",
    )
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
            "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
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
    if args.keys_listen:
        overrides["keyserver.listen"] = args.keys_listen
        if args.command == "run" and not args.keys_target:
            overrides["keyserver.target"] = args.keys_listen
    if args.keys_target:
        overrides["keyserver.target"] = args.keys_target
    return load(args.config, overrides)


def _reload_tls() -> None:
    """SIGHUP: every TLS server of this process reads its files at its next handshake."""
    from relay.common.tls import reload_all  # noqa: PLC0415

    reload_all()
    log.info("SIGHUP: TLS certificates and keys are read again at the next handshake")


async def serve(config: Config, command: str) -> None:
    """Run the servers ``command`` names until SIGINT or SIGTERM."""
    from keyserver.app import KeyserverApp  # noqa: PLC0415 - only what is run is imported
    from relay.common.device_events import LocalDeviceEvents  # noqa: PLC0415
    from relay.server import gctune  # noqa: PLC0415
    from relay.server.app import RelayApp  # noqa: PLC0415

    gc_settings = gctune.from_env()  # a bad RELAY_GC fails before anything starts
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_tls)
    # Both in one process (``run``): removals reach the relay node in-process, unless
    # presence is in Redis, where both use Redis pub/sub (other relay nodes hear it too).
    local = command == "run" and config.presence.backend != "redis"
    events = LocalDeviceEvents() if local else None
    async with contextlib.AsyncExitStack() as stack:
        if command in ("run", "keyserver"):
            keys = await stack.enter_async_context(KeyserverApp(config, events=events))
            log.info("key directory listening on %s", keys.address)
        if command in ("run", "relay"):
            node = await stack.enter_async_context(RelayApp(config, events=events))
            log.info("relay node %s listening on %s", config.node.id, node.address)
        log.info("ready (storage: %s at %s)", config.storage.backend, config.storage.data_dir)
        gctune.apply(gc_settings)  # after start-up: see relay/server/gctune.py
        await stop.wait()
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``relayd``."""
    args = _parser().parse_args(argv)
    if args.command in ("gen-tenant-key", "mint-token"):
        return run_token_tool(args)
    if args.command == "gen-api-key":
        return run_gen_api_key(args)
    if args.command == "dev-certs":
        return run_dev_certs(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
    try:
        import uvloop  # noqa: PLC0415

        uvloop.run(serve(config, args.command))
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
