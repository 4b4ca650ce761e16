"""``relayd``: run the relay node and/or the key directory.

relayd run         relay node + key directory in one process (the embedded default)
relayd relay       a relay node only
relayd keyserver   the key directory only
relayd config      print the effective configuration
relayd migrate     apply the Cassandra schema migrations
relayd gen-tenant-key PREFIX   make a tenant signing key for registration tokens
relayd mint-token  mint a registration token (what a tenant's backend does)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.config import Config, ConfigError, load

log = logging.getLogger("relayd")


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
    return parser


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
