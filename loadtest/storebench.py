"""(b) Store-and-forward on Cassandra against a raw cassandra-driver loop of the same rows.

Relay side (``Bench.store_vs_driver`` drives it with the usual generator): a fresh
``relayd run`` with ``storage.backend = "cassandra"`` on a keyspace of its own (created
by the migrations here, dropped afterwards), pinned like every server under test. Half
the devices stay offline and the generator sends only to them (``offline_recipients``),
so every envelope takes the store's append path and is answered STORED once durable
(LOCAL_QUORUM). A step ladder finds the highest rate of STORED answers sustained (at
least 95 % of the offer, no errors). Then the offline devices connect and drain their
queues, and every acknowledged id is reconciled: one missing envelope fails the bench.

Driver side: a subprocess pinned to the same CPUs (``python -m loadtest.storebench
driver``) writes the same rows into the same ``queue`` table of the same keyspace, with
the relay's own statement (``INSERT_ROW``: prepared, TTL, same partition and clustering
key, same payload size), the relay's cluster settings (``build_cluster``: LOCAL_QUORUM,
token-aware routing) and the relay's concurrency (``cassandra.write_concurrency``
statements in flight), for the same number of recipient devices. Two shapes, each timed
over a fixed duration after a warm-up:

- ``single``: one prepared INSERT per row (``execute_concurrent_with_args``);
- ``grouped``: the rows of one SendBatch (``group`` envelopes to one recipient) as one
  single-partition unlogged batch, which is how the relay writes queue rows.

Afterwards the driver counts its rows per partition (``SELECT COUNT(*)``); every row it
wrote must be there. ``store_vs_driver_ratio`` = the relay's rate / the better driver
shape's rate (the raw driver's best is the bar).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from relay.clock import SystemClock
from relay.config import DEFAULT_TTL_SECONDS, CassandraConfig

#: The script that starts the local services (``make services``).
SERVICES = Path(__file__).resolve().parents[1] / "scripts" / "services" / "services.sh"
#: Longest wait for the services script to bring Cassandra up.
START_TIMEOUT_S = 300.0
#: Seconds of driver writes before the timed window.
WARMUP_S = 1.0
#: Rows handed to the driver per concurrent call (it drains between calls).
CHUNK_GROUPS = 64
SHAPES = ("single", "grouped")
#: The tenant of the driver's rows (the relay's rows use the generator's tenant).
DRIVER_TENANT = "storebench-driver"


class StoreBenchError(RuntimeError):
    """Cassandra could not be used, or a driver run lost rows."""


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_cassandra(host: str = "127.0.0.1", port: int = 9042) -> bool:
    """Make sure Cassandra answers; start it with the services script if it does not.

    Returns True when this call started it (the caller stops it afterwards), False when it
    was already running (the caller must leave it running: others use it).
    """
    if reachable(host, port):
        return False
    proc = subprocess.run(
        ["bash", str(SERVICES), "start-cassandra"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0 or not reachable(host, port):
        raise StoreBenchError(
            f"Cassandra did not start ({SERVICES} start-cassandra exited {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-2000:]
        )
    return True


def stop_cassandra() -> None:
    """Stop the Cassandra that ``ensure_cassandra`` started."""
    subprocess.run(
        ["bash", str(SERVICES), "stop-cassandra"],
        capture_output=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


def bench_config(host: str = "127.0.0.1", port: int = 9042) -> CassandraConfig:
    """Settings for a keyspace of the bench's own (random name), relay defaults otherwise."""
    return CassandraConfig(
        contact_points=(host,),
        port=port,
        keyspace=f"relay_bench_{secrets.token_hex(4)}",
        request_timeout_seconds=30.0,
    )


@contextlib.contextmanager
def keyspace(config: CassandraConfig) -> Iterator[CassandraConfig]:
    """Create and migrate ``config.keyspace``; drop it on the way out (bounded)."""
    from relay.stores.cassandra.migrate import migrate  # noqa: PLC0415 - optional driver

    asyncio.run(migrate(config))
    try:
        yield config
    finally:
        with contextlib.suppress(Exception):  # best effort: a stray keyspace costs disk only
            asyncio.run(_drop(config))


async def _drop(config: CassandraConfig) -> None:
    from relay.common.cassandra.session import CassandraSession  # noqa: PLC0415

    async with CassandraSession(config, keyspace="") as admin:
        await admin.execute_ddl(f"DROP KEYSPACE IF EXISTS {config.keyspace}", op="drop")


def relay_config(path: Path, config: CassandraConfig, data_dir: Path) -> Path:
    """Write a relayd TOML file for ``storage.backend = "cassandra"`` on ``config``."""
    points = ", ".join(json.dumps(p) for p in config.contact_points)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[storage]\n"
        'backend = "cassandra"\n'
        f"data_dir = {json.dumps(str(data_dir))}\n\n"
        "[cassandra]\n"
        f"contact_points = [{points}]\n"
        f"port = {config.port}\n"
        f"keyspace = {json.dumps(config.keyspace)}\n"
        f"consistency = {json.dumps(config.consistency)}\n"
        f"request_timeout_seconds = {config.request_timeout_seconds}\n"
        f"write_concurrency = {config.write_concurrency}\n"
    )
    return path


@dataclasses.dataclass(frozen=True, slots=True)
class DriverPlan:
    """One raw driver run: where, what shape, how long, how many rows of what size."""

    keyspace: str
    shape: str = "single"
    seconds: float = 6.0
    warmup_s: float = WARMUP_S
    devices: int = 50
    group: int = 20
    payload_bytes: int = 256
    concurrency: int = 64
    host: str = "127.0.0.1"
    port: int = 9042


class _DriverRun:
    """The rows of one driver run and the two ways of writing them."""

    def __init__(self, plan: DriverPlan, session: Any, insert: Any) -> None:
        from relay.stores.cassandra.layout import SeqSource  # noqa: PLC0415 - optional driver

        self.plan, self.session, self.insert = plan, session, insert
        self.clock = SystemClock()
        self.seqs = SeqSource(self.clock)
        tag = secrets.token_hex(4)
        self.users = [f"drv-{tag}-{d}" for d in range(plan.devices)]
        self.content = os.urandom(plan.payload_bytes)
        self.written: Counter[tuple[str, int]] = Counter()
        self.group_no = 0

    def groups(self, n: int) -> list[list[tuple[Any, ...]]]:
        """The next ``n`` groups: ``plan.group`` rows each, to one device (round-robin)."""
        from relay.stores.cassandra.layout import (  # noqa: PLC0415
            DEFAULT_BUCKET_MS,
            bucket_of,
            ttl_until,
        )

        plan = self.plan
        now = self.clock.now_ms()
        expires = now + DEFAULT_TTL_SECONDS * 1000
        ttl = ttl_until(expires, now)
        out = []
        for _ in range(n):
            user = self.users[self.group_no % plan.devices]
            self.group_no += 1
            rows = []
            for _ in range(plan.group):
                seq = self.seqs.next()
                bucket = bucket_of(seq, DEFAULT_BUCKET_MS)
                self.written[(user, bucket)] += 1
                rows.append(
                    (DRIVER_TENANT, user, 1, bucket, seq, os.urandom(16), DRIVER_TENANT,
                     "sender", 1, self.content, now, expires, plan.payload_bytes + 64, ttl)
                )  # fmt: skip
            out.append(rows)
        return out

    def write(self, groups: list[list[tuple[Any, ...]]]) -> int:
        """Write ``groups`` in the plan's shape, ``plan.concurrency`` in flight; rows written."""
        from cassandra import ConsistencyLevel  # noqa: PLC0415
        from cassandra.concurrent import (  # noqa: PLC0415
            execute_concurrent,
            execute_concurrent_with_args,
        )
        from cassandra.query import BatchStatement, BatchType  # noqa: PLC0415

        c = self.plan.concurrency
        if self.plan.shape == "single":
            params = [row for g in groups for row in g]
            execute_concurrent_with_args(
                self.session, self.insert, params, concurrency=c,
                raise_on_first_error=True, results_generator=False,
            )  # fmt: skip
            return len(params)
        statements = []
        for g in groups:
            batch = BatchStatement(
                batch_type=BatchType.UNLOGGED, consistency_level=ConsistencyLevel.LOCAL_QUORUM
            )
            for row in g:
                batch.add(self.insert, row)
            statements.append((batch, ()))
        execute_concurrent(
            self.session, statements, concurrency=c,
            raise_on_first_error=True, results_generator=False,
        )  # fmt: skip
        return sum(len(g) for g in groups)

    def count(self) -> int:
        """Rows now in the partitions this run wrote to."""
        count = self.session.prepare(
            f"SELECT COUNT(*) FROM {self.plan.keyspace}.queue"
            " WHERE tenant = ? AND user = ? AND device = ? AND bucket = ?"
        )
        return sum(
            int(self.session.execute(count, (DRIVER_TENANT, user, 1, bucket)).one()[0])
            for user, bucket in self.written
        )


def driver_loop(plan: DriverPlan) -> dict[str, Any]:
    """Write queue rows with the bare driver for ``plan.seconds``; count them afterwards.

    Returns the timed rate (rows/s), the rows written (warm-up included) and counted, and
    the CPU share this process used while timed.
    """
    from relay.common.cassandra.session import build_cluster  # noqa: PLC0415
    from relay.stores.cassandra.queue import INSERT_ROW  # noqa: PLC0415 - optional driver

    if plan.shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    config = CassandraConfig(
        contact_points=(plan.host,),
        port=plan.port,
        keyspace=plan.keyspace,
        write_concurrency=plan.concurrency,
        request_timeout_seconds=30.0,
    )
    cluster = build_cluster(config)
    try:
        session = cluster.connect(plan.keyspace)
        run = _DriverRun(plan, session, session.prepare(INSERT_ROW.format(ks=plan.keyspace)))
        chunk = max(1, CHUNK_GROUPS * plan.concurrency // max(1, plan.group))
        warm_end = time.monotonic() + plan.warmup_s
        while time.monotonic() < warm_end:
            run.write(run.groups(chunk))
        timed = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < plan.seconds:
            timed += run.write(run.groups(chunk))
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        counted = run.count()
    finally:
        cluster.shutdown()
    total = sum(run.written.values())
    return {
        "shape": plan.shape,
        "rows_per_s": round(timed / elapsed, 1),
        "timed_rows": timed,
        "timed_s": round(elapsed, 3),
        "rows_written": total,
        "rows_counted": counted,
        "lost": total - counted,
        "driver_cpu_share": round(cpu / elapsed, 3),
        "concurrency": plan.concurrency,
        "group": plan.group,
        "devices": plan.devices,
    }


def run_driver(plan: DriverPlan, cpus: Sequence[int] = ()) -> dict[str, Any]:
    """``driver_loop`` in a subprocess pinned to ``cpus`` (like the servers under test).

    Raises StoreBenchError if it failed or if any row it wrote is missing.
    """
    plan_json = json.dumps(dataclasses.asdict(plan))
    argv = [sys.executable, "-m", "loadtest.storebench", "driver", plan_json]
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    timeout = plan.seconds + plan.warmup_s + 300
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise StoreBenchError(f"driver loop failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["lost"]:
        raise StoreBenchError(
            f"driver loop: {result['lost']} of {result['rows_written']} rows missing"
        )
    return result


def ratio(relay_rate: float, driver: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The (b) figure from the relay's rate and the driver runs (best shape is the bar)."""
    best: dict[str, float] = {}
    for run in driver:
        best[run["shape"]] = max(best.get(run["shape"], 0.0), run["rows_per_s"])
    bar = max(best.values(), default=0.0)
    return {
        "store_vs_driver_ratio": round(relay_rate / bar, 3) if bar and relay_rate else None,
        "relay_stored_per_s": relay_rate,
        "driver_rows_per_s": best,
        "driver_bar": max(best, key=lambda k: best[k]) if best else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loadtest.storebench driver PLAN_JSON``: one driver run, JSON on stdout."""
    parser = argparse.ArgumentParser(prog="loadtest.storebench")
    parser.add_argument("command", choices=["driver"])
    parser.add_argument("plan", help="a DriverPlan as JSON")
    args = parser.parse_args(argv)
    plan = DriverPlan(**json.loads(args.plan))
    print(json.dumps(driver_loop(plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
