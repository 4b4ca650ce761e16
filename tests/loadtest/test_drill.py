"""Failure drills with the load generator: a node SIGKILLed mid-run, devices fail over.

Three ``relayd relay`` processes on the real Cassandra (a keyspace of this test's own,
dropped at the end) and Redis (a key prefix of its own), the generator sending across
nodes; one node is SIGKILLed once enough envelopes were acknowledged. The generator must
move that node's devices to the others as the SDK does, keep going, and reconcile every
acknowledged envelope with nothing missing; the report carries the reconnect figures.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import report, storebench
from loadtest.cli import main
from loadtest.cluster import relay_cluster
from loadtest.config import LoadConfig
from loadtest.runner import Coordinator, IntervalTotals
from relay.config import CassandraConfig
from tests.process import Relayd, free_port
from tests.services import CASSANDRA_PORT, REDIS_PORT, REDIS_URL, require

#: Acknowledged envelopes before the kill (the run offers 300/s for 6 s: 1,800).
KILL_AFTER_ACKED = 500


@pytest.fixture
def keyspace() -> Iterator[CassandraConfig]:
    """A migrated keyspace of this test's own, dropped afterwards."""
    require("Cassandra", CASSANDRA_PORT)
    require("Redis", REDIS_PORT)
    config = CassandraConfig(
        port=CASSANDRA_PORT,
        keyspace=f"relay_drill_{uuid.uuid4().hex[:10]}",
        request_timeout_seconds=30.0,
    )
    with storebench.keyspace(config) as cass:
        yield cass


@pytest.mark.services
@pytest.mark.integration
def test_a_node_sigkilled_mid_run_loses_nothing_and_its_devices_fail_over(
    keyspace: CassandraConfig, tmp_path: Path
) -> None:
    with relay_cluster(tmp_path / "cluster", keyspace, redis_url=REDIS_URL) as cluster:
        victim = 1
        cfg = LoadConfig(
            targets=cluster.targets,
            keys=(cluster.keys,),
            devices=30,
            workers=2,
            connections=6,
            schedule="constant:300",
            duration_s=6.0,
            batch=10,
            fanout=2,
            cross_node=True,
            interval_s=0.5,
            drain_timeout_s=30.0,
            setup_timeout_s=60.0,
            quiet=True,
        )
        acked: list[int] = []
        killed: list[int] = []

        def kill_once(t: IntervalTotals) -> None:
            acked.append(t.acked)
            if sum(acked) >= KILL_AFTER_ACKED and not killed:
                cluster.nodes[victim].kill()  # SIGKILL: sends and deliveries in flight on it
                killed.append(t.index)

        result = Coordinator(cfg, on_interval=kill_once).run()
        survivors_alive = all(n.proc is not None and n.proc.poll() is None for n in
                              (cluster.nodes[0], cluster.nodes[2]))  # fmt: skip
    rep = report.build(result)
    (tmp_path / "drill.json").write_text(json.dumps(rep, indent=2))
    assert killed, "the node was never killed"
    assert survivors_alive
    on_victim = sum(1 for d in range(cfg.devices) if cfg.node_of(d) == victim)
    recon = rep["reconciliation"]
    assert recon["ok"], rep["verdict"]
    assert recon["missing"] == 0
    assert recon["unexpected"] == 0
    # Acknowledged after the kill too: the run went on on the other nodes.
    assert recon["acknowledged"] > sum(acked[: killed[0] + 1])
    assert rep["drain_complete"]
    f = rep["failover"]
    assert f["streams_lost"] == on_victim == 10
    assert f["reconnected"] == on_victim
    assert f["gave_up"] == 0
    # The SDK's order: the next target after the dead one, which is alive.
    assert f["moves"] == {f"{victim}->{victim + 1}": on_victim}
    r = f["reconnect_ms"]
    assert r["count"] == on_victim
    assert 0 < r["p50"] <= r["p99"] <= r["max"] < 30_000
    assert f["stored_meanwhile"] >= 0
    assert rep["errors"].get("STREAM_UNAVAILABLE", 0) == on_victim
    assert sum(f["reasons"].values()) == on_victim
    assert all(reason.startswith("UNAVAILABLE: ") for reason in f["reasons"])
    assert "failover: 10 streams lost, 10 devices back" in report.table(rep)


@pytest.mark.integration
def test_devices_homed_on_a_dead_target_connect_to_the_next_one(tmp_path: Path) -> None:
    """Without failover the first dial to the dead target ended the run (exit 3)."""
    # No drain delay on SIGTERM: nothing but this test routes to it.
    config = tmp_path / "relayd.toml"
    config.write_text("[node]\ndrain_delay_seconds = 0\ngrace_seconds = 1.0\n")
    relayd = Relayd(tmp_path / "data", config=config)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    try:
        asyncio.run(relayd.start())
        out = tmp_path / "report.json"
        argv = [
            "run", "--target", dead, "--target", relayd.relay_address,
            "--keys", relayd.keys_address, "--devices", "12", "--rate", "200",
            "--duration", "2", "--batch", "5", "--interval", "0.5", "--offline-fraction", "0.25",
            "--drain-timeout", "20", "--setup-timeout", "30", "--quiet", "--json", str(out),
        ]  # fmt: skip
        code = main(argv)
    finally:
        relayd.stop()
    rep = json.loads(out.read_text())
    assert code == 0, rep["verdict"]
    recon = rep["reconciliation"]
    assert recon["missing"] == 0
    assert recon["acknowledged"] == 400
    # The offline devices homed on the dead target came online at the drain elsewhere.
    assert rep["latency_ms"]["store_and_forward"]["count"] > 0
    f = rep["failover"]
    assert f["streams_lost"] == 0  # nothing was lost during the run
    # One refused dial per online device homed on the dead target (devices 0, 2, .., 10).
    assert f["failed_attempts"] == 6


@pytest.mark.integration
def test_a_refused_handshake_is_not_retried_on_every_target(tmp_path: Path) -> None:
    """Devices registered with another key directory are refused: the run fails at once
    (exit 3) instead of dialling target after target until the setup timeout."""
    config = tmp_path / "relayd.toml"
    config.write_text("[node]\ndrain_delay_seconds = 0\ngrace_seconds = 1.0\n")
    keys_of, relay = Relayd(tmp_path / "a", config=config), Relayd(tmp_path / "b", config=config)
    try:
        asyncio.run(keys_of.start())
        asyncio.run(relay.start())
        argv = [
            "run", "--target", relay.relay_address, "--keys", keys_of.keys_address,
            "--devices", "4", "--rate", "10", "--duration", "1", "--batch", "1",
            "--setup-timeout", "120", "--quiet",
        ]  # fmt: skip
        started = time.monotonic()
        code = main(argv)
        elapsed = time.monotonic() - started
    finally:
        keys_of.stop()
        relay.stop()
    assert code == 3
    assert elapsed < 60
