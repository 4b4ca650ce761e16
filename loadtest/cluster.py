"""A relay cluster as processes: ``relayd keyserver`` and N ``relayd relay`` nodes.

Every process reads one TOML file: storage on Cassandra (a keyspace the caller created
and migrated, e.g. with ``storebench.keyspace``), presence in Redis under a key prefix of
this cluster's own (so several clusters and tests share one Redis), one relay-node key
file, and ``presence.node_ttl_seconds`` short enough that a killed node's devices count
as offline within seconds. The key directory starts first (it makes the node key file),
then the nodes, each on a free loopback port with its own node id (``relay-0`` ...).
Nodes find each other through presence and route over node links.

Bench phase (e) (``loadtest.bench``), the failure-drill test (``tests/loadtest``) and
``relay-loadtest cluster`` (the manual drill of docs/operations.md) all start it here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtest import storebench
from loadtest.forwarder import KEYS_SERVICE, RELAY_SERVICE
from loadtest.servers import Endpoints, ServerProcess, free_port, python_module
from relay.config import CassandraConfig

DEFAULT_NODES = 3
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Seconds a node's liveness key outlives its last refresh: a SIGKILLed node's devices
#: count as offline this long after the kill (the relay's default is 10 s).
DEFAULT_NODE_TTL_S = 3.0
#: Seconds a stopping node gives open calls (a drill stops the survivors at the end).
GRACE_S = 1.0


@dataclass
class RelayCluster:
    """The processes of a running cluster and where the generator finds them."""

    keyserver: ServerProcess
    nodes: list[ServerProcess]
    targets: tuple[str, ...]
    keys: str
    config: Path
    key_prefix: str

    @property
    def endpoints(self) -> Endpoints:
        """Every node as a target, the key directory for registration."""
        return Endpoints(self.targets[0], self.keys, targets=self.targets)

    @property
    def pids(self) -> list[int]:
        """Process ids of the nodes and the key directory (running or not)."""
        return [p.pid for p in (*self.nodes, self.keyserver) if p.proc is not None]


def write_config(
    path: Path,
    cass: CassandraConfig,
    *,
    data_dir: Path,
    keys: str,
    redis_url: str,
    key_prefix: str,
    node_ttl_s: float,
) -> Path:
    """The TOML file every process of the cluster reads."""
    points = ", ".join(json.dumps(p) for p in cass.contact_points)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[storage]\n"
        'backend = "cassandra"\n'
        f"data_dir = {json.dumps(str(data_dir))}\n\n"
        "[cassandra]\n"
        f"contact_points = [{points}]\n"
        f"port = {cass.port}\n"
        f"keyspace = {json.dumps(cass.keyspace)}\n"
        f"consistency = {json.dumps(cass.consistency)}\n"
        f"request_timeout_seconds = {cass.request_timeout_seconds}\n"
        f"write_concurrency = {cass.write_concurrency}\n\n"
        "[presence]\n"
        'backend = "redis"\n'
        f"redis_url = {json.dumps(redis_url)}\n"
        f"key_prefix = {json.dumps(key_prefix)}\n"
        f"node_ttl_seconds = {node_ttl_s}\n\n"
        "[keyserver]\n"
        f"target = {json.dumps(keys)}\n"
        f"relay_key_file = {json.dumps(str(data_dir / 'relay-node.key'))}\n\n"
        "[node]\n"
        f"grace_seconds = {GRACE_S}\n"
        # Stop at once on SIGTERM: nothing routes to these nodes but the generator.
        "drain_delay_seconds = 0\n\n"
        # Several processes on one host: the default metrics ports would collide.
        "[metrics]\n"
        'listen = "off"\n'
        'keyserver_listen = "off"\n'
    )
    return path


def _stop_all(procs: list[ServerProcess]) -> None:
    """SIGTERM every process at once, then wait for each (``ServerProcess.stop``)."""
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.terminate()
    for proc in procs:
        proc.stop()


@contextlib.contextmanager
def relay_cluster(
    work: Path,
    cass: CassandraConfig,
    *,
    nodes: int = DEFAULT_NODES,
    redis_url: str = DEFAULT_REDIS_URL,
    node_ttl_s: float = DEFAULT_NODE_TTL_S,
    cpus: tuple[int, ...] = (),
) -> Iterator[RelayCluster]:
    """Start the key directory and ``nodes`` relay nodes; stop them all on the way out.

    ``work`` holds the config, the nodes' data directories and every process's log
    (``<name>.log``); ``cpus`` pins every process of the cluster (taskset).
    """
    keys = f"127.0.0.1:{free_port()}"
    prefix = f"lt-{secrets.token_hex(4)}:"
    config = write_config(
        work / "cluster.toml",
        cass,
        data_dir=work / "data",
        keys=keys,
        redis_url=redis_url,
        key_prefix=prefix,
        node_ttl_s=node_ttl_s,
    )
    common = ["--config", str(config), "--log-level", "WARNING"]
    keyserver = ServerProcess(
        "keyserver",
        [*python_module("relay.cli.relayd"), "keyserver", "--keys-listen", keys, *common],
        [(keys, [KEYS_SERVICE])],
        work / "keyserver.log",
        cpus,
    )
    procs: list[ServerProcess] = []
    targets: list[str] = []
    for i in range(nodes):
        target = f"127.0.0.1:{free_port()}"
        argv = [
            *python_module("relay.cli.relayd"), "relay", "--listen", target,
            "--node-id", f"relay-{i}", "--data-dir", str(work / f"node{i}"), *common,
        ]  # fmt: skip
        procs.append(
            ServerProcess(
                f"relay-{i}", argv, [(target, [RELAY_SERVICE])], work / f"relay-{i}.log", cpus
            )
        )
        targets.append(target)
    with contextlib.ExitStack() as stack:
        stack.enter_context(keyserver)  # first: it makes the relay-node key file
        stack.callback(_stop_all, procs)
        for node in procs:  # the nodes start side by side
            node.spawn()
        for node in procs:
            node.wait_ready()
        yield RelayCluster(keyserver, procs, tuple(targets), keys, config, prefix)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``relay-loadtest cluster``."""
    d = "(default: %(default)s)"
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES, help=f"relay nodes {d}")
    p.add_argument(
        "--info",
        type=Path,
        metavar="DIR",
        help="write DIR/args (the --target/--keys options of `relay-loadtest run`) and "
        "DIR/<name>.pid for each process, for scripting a drill (default: none)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        help="config, data and logs of the processes (default: a new temporary directory)",
    )
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"presence Redis {d}")
    p.add_argument("--cassandra-port", type=int, default=9042, help=f"on 127.0.0.1 {d}")
    p.add_argument(
        "--node-ttl",
        type=float,
        default=DEFAULT_NODE_TTL_S,
        help=f"presence.node_ttl_seconds: how soon a killed node's devices count as offline {d}",
    )


def command(args: argparse.Namespace) -> int:
    """``relay-loadtest cluster``: run a cluster until SIGINT/SIGTERM, then clean up."""
    if not storebench.reachable("127.0.0.1", args.cassandra_port):
        print(
            f"relay-loadtest cluster: no Cassandra on 127.0.0.1:{args.cassandra_port} "
            "(run `make services`)",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="relay-cluster-"))
    config = storebench.bench_config(port=args.cassandra_port)
    with (
        storebench.keyspace(config) as cass,
        relay_cluster(
            work, cass, nodes=args.nodes, redis_url=args.redis_url, node_ttl_s=args.node_ttl
        ) as c,
    ):
        run_args = " ".join([*(f"--target {t}" for t in c.targets), f"--keys {c.keys}"])
        if args.info:
            _write_info(args.info, c, run_args)
        lines = [
            f"cluster up: keyspace {cass.keyspace}, presence prefix {c.key_prefix!r}, "
            f"logs in {work}",
            *(f"  {n.name:10} {t:22} pid {n.pid}" for n, t in zip(c.nodes, c.targets, strict=True)),
            f"  {'keyserver':10} {c.keys:22} pid {c.keyserver.pid}",
            f"load it:  relay-loadtest run {run_args} --cross-node ...",
            "Ctrl-C (or SIGTERM) stops every process and drops the keyspace.",
        ]
        print("\n".join(lines), flush=True)
        stop.wait()
        print("stopping the cluster", flush=True)
    return 0


def _write_info(info: Path, c: RelayCluster, run_args: str) -> None:
    info.mkdir(parents=True, exist_ok=True)
    (info / "args").write_text(run_args + "\n")
    for proc in (*c.nodes, c.keyserver):
        (info / f"{proc.name}.pid").write_text(f"{proc.pid}\n")
