"""``relay-loadtest``: load a relay open-loop, report latency, throughput and loss.

relay-loadtest run         one load run against running relay node(s)
relay-loadtest forwarder   serve the bare grpc.aio forwarder (the benchmark baseline)
relay-loadtest bench       the whole benchmark (``make bench``)
relay-loadtest cluster     relay nodes on Cassandra + Redis as processes (failure drills)

Exit status of ``run``: 0 all acknowledged envelopes delivered; 1 loss (acknowledged
envelopes missing, or a contract violation); 2 bad options; 3 the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest import config as c
from loadtest.config import ConfigError, LoadConfig
from loadtest.schedule import ScheduleError
from relay.cli.output import quiet_broken_pipe, version_text

EXIT_OK, EXIT_LOSS, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"1"``, ``"0,1"`` or ``"0-3"`` as a tuple of CPU numbers."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return tuple(cpus)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` (each says its default)."""
    d = "(default: %(default)s)"
    g = p.add_argument_group("targets")
    g.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT",
        help="relay node; repeat for several, devices are spread round-robin "
        f"(default: {c.DEFAULT_TARGET})",
    )
    g.add_argument(
        "--keys",
        action="append",
        metavar="HOST:PORT",
        help="key directory devices register with; one, or one per --target "
        f"(default: {c.DEFAULT_KEYS})",
    )
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        default="",
        help="PEM file of the CA that signed the targets' TLS certificates (default: the "
        "system's CAs; plaintext to loopback targets without it)",
    )
    g.add_argument(
        "--cross-node",
        action="store_true",
        help="send to recipients on any node (only if the nodes route between each other); "
        "by default a batch goes to devices on the sender's node",
    )
    g = p.add_argument_group("devices and connections")
    g.add_argument(
        "--devices",
        type=int,
        default=c.DEFAULT_DEVICES,
        help=f"simulated devices, each with its own Connect stream {d}",
    )
    g.add_argument(
        "--connections",
        type=int,
        default=c.DEFAULT_CONNECTIONS,
        help=f"TCP connections (gRPC channels) in total, split over workers and targets {d}",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=c.DEFAULT_WORKERS,
        help=f"generator processes; worker w holds devices d with d %% workers == w {d}",
    )
    g.add_argument(
        "--offline-fraction",
        type=float,
        default=0.0,
        help="share of devices offline during the run; they connect at the end and drain "
        f"their stored envelopes {d}",
    )
    g.add_argument(
        "--offline-recipients",
        action="store_true",
        help="send only to the offline devices (store-and-forward: every envelope is stored, "
        "none delivered live); steps and --stop-on-saturation then count acknowledged "
        "envelopes instead of delivered ones",
    )
    g.add_argument(
        "--tenant", default=c.DEFAULT_TENANT, help=f"tenant of the simulated devices {d}"
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--schedule",
        default=c.DEFAULT_SCHEDULE,
        help="envelopes/s over time: RATE | constant:RATE | step:R1,R2,...[@SECONDS_PER_STEP]"
        " | ramp:FROM:TO (default: %(default)s)",
    )
    g.add_argument("--rate", type=float, help="shorthand for --schedule constant:RATE")
    g.add_argument(
        "--duration",
        type=float,
        default=c.DEFAULT_DURATION_S,
        help=f"seconds of load (a step schedule with @SECONDS sets its own) {d}",
    )
    g.add_argument(
        "--payload",
        type=int,
        default=c.DEFAULT_PAYLOAD_BYTES,
        help=f"bytes of content per envelope, at least the 24-byte header {d}",
    )
    g.add_argument(
        "--batch",
        type=int,
        default=c.DEFAULT_BATCH,
        help=f"envelopes per SendBatch stream message {d}",
    )
    g.add_argument(
        "--fanout",
        type=int,
        default=c.DEFAULT_FANOUT,
        help=f"distinct recipient devices per batch {d}",
    )
    g.add_argument(
        "--max-backlog",
        type=int,
        default=c.DEFAULT_MAX_BACKLOG,
        help="unanswered envelopes per worker past which due batches are dropped as "
        f"GENERATOR_BACKLOG {d}",
    )
    g.add_argument(
        "--stop-on-saturation",
        action="store_true",
        help="stop the schedule once intervals covering 1 s (at least two) in a row deliver under "
        "--saturation-ratio of the offer, have errors, or a p99 over --stop-p99-ms",
    )
    g.add_argument(
        "--saturation-ratio",
        type=float,
        default=c.DEFAULT_SATURATION_RATIO,
        help=f"see --stop-on-saturation {d}",
    )
    g.add_argument(
        "--stop-p99-ms",
        type=float,
        default=c.DEFAULT_STOP_P99_MS,
        help=f"see --stop-on-saturation {d}",
    )
    g = p.add_argument_group("timing and limits")
    g.add_argument(
        "--interval",
        type=float,
        default=c.DEFAULT_INTERVAL_S,
        help=f"seconds per progress line and plot point {d}",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=c.DEFAULT_DRAIN_TIMEOUT_S,
        help=f"seconds to wait for answers, then for deliveries, after the load {d}",
    )
    g.add_argument(
        "--setup-timeout",
        type=float,
        default=c.DEFAULT_SETUP_TIMEOUT_S,
        help=f"seconds allowed to register devices and open streams {d}",
    )
    g.add_argument(
        "--register-concurrency",
        type=int,
        default=c.DEFAULT_REGISTER_CONCURRENCY,
        help=f"RegisterDevice calls in flight per worker {d}",
    )
    g.add_argument(
        "--connect-concurrency",
        type=int,
        default=c.DEFAULT_CONNECT_CONCURRENCY,
        help=f"Connect handshakes in flight per worker {d}",
    )
    g.add_argument(
        "--cpus",
        type=parse_cpus,
        default=(),
        help="pin the generator to these CPUs, e.g. 1 or 0-1 (default: not pinned)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--json", type=Path, metavar="FILE", help="write the JSON report here (default: none)"
    )
    g.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="write the latency plot here (default: none)"
    )
    g.add_argument(
        "--prometheus-port",
        type=int,
        default=0,
        help="serve metrics on 127.0.0.1:PORT while running (default: 0, off)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress lines, only the final table")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig the options describe (validated)."""
    schedule = f"constant:{args.rate:g}" if args.rate is not None else args.schedule
    return LoadConfig(
        targets=tuple(args.target or (c.DEFAULT_TARGET,)),
        keys=tuple(args.keys or (c.DEFAULT_KEYS,)),
        tls_ca=args.tls_ca,
        devices=args.devices,
        connections=args.connections,
        workers=args.workers,
        schedule=schedule,
        duration_s=args.duration,
        payload_bytes=args.payload,
        batch=args.batch,
        fanout=args.fanout,
        offline_fraction=args.offline_fraction,
        offline_recipients=args.offline_recipients,
        tenant=args.tenant,
        interval_s=args.interval,
        drain_timeout_s=args.drain_timeout,
        setup_timeout_s=args.setup_timeout,
        register_concurrency=args.register_concurrency,
        connect_concurrency=args.connect_concurrency,
        max_backlog=args.max_backlog,
        stop_on_saturation=args.stop_on_saturation,
        saturation_ratio=args.saturation_ratio,
        stop_p99_ms=args.stop_p99_ms,
        cross_node=args.cross_node,
        cpus=args.cpus,
        prometheus_port=args.prometheus_port,
        quiet=args.quiet,
    ).validate()


def run_command(args: argparse.Namespace) -> int:
    """``relay-loadtest run``."""
    from loadtest import plot, report  # noqa: PLC0415 - matplotlib only when running
    from loadtest.runner import Coordinator, RunError  # noqa: PLC0415

    try:
        cfg = config_from_args(args)
    except (ConfigError, ScheduleError) as exc:
        print(f"relay-loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.cpus:
        os.sched_setaffinity(0, set(cfg.cpus))
    try:
        result = Coordinator(cfg).run()
    except RunError as exc:
        print(f"relay-loadtest: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    rep = report.build(result)
    print(report.table(rep))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_png(rep, args.plot)
    if not rep["ok"]:
        print("\n" + "!" * 78 + f"\n{rep['verdict']}\n" + "!" * 78, file=sys.stderr)
        return EXIT_LOSS
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    """The ``relay-loadtest`` argument parser."""
    from loadtest import bench, cluster, forwarder  # noqa: PLC0415 - keep --help light

    top = argparse.ArgumentParser(
        prog="relay-loadtest",
        description="Open-loop load generator for the relay: latency from each envelope's "
        "intended send time (HdrHistogram), throughput, and loss accounting of every message id.",
        epilog="Targets must be on this machine's loopback. See docs/benchmarks.md.",
    )
    top.add_argument("--version", action="version", version=version_text("relay-loadtest"))
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="one load run against running relay node(s)",
        description="Register devices, open their streams, send on schedule, drain, reconcile. "
        "Exit 0 when every acknowledged envelope was delivered, 1 on loss.",
    )
    add_run_arguments(run)
    run.set_defaults(func=run_command)
    fwd = sub.add_parser(
        "forwarder",
        help="serve the bare grpc.aio forwarder baseline",
        description=forwarder.__doc__,
    )
    forwarder.add_arguments(fwd)
    fwd.set_defaults(func=forwarder.command)
    b = sub.add_parser(
        "bench",
        help="the whole benchmark (make bench)",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(b)
    b.set_defaults(func=bench.command)
    cl = sub.add_parser(
        "cluster",
        help="relay nodes on Cassandra + Redis as processes, for failure drills",
        description=cluster.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cluster.add_arguments(cl)
    cl.set_defaults(func=cluster.command)
    return top


@quiet_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``relay-loadtest``."""
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
