"""The store-and-forward comparison of ``make bench`` (b): its arithmetic, and a short
real run of both sides against the local Cassandra (``make services``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest import servers, storebench
from loadtest.cli import main
from loadtest.config import ConfigError, LoadConfig


def test_ratio_takes_the_better_driver_shape_as_the_bar() -> None:
    runs = [
        {"shape": "single", "rows_per_s": 4000.0},
        {"shape": "grouped", "rows_per_s": 20000.0},
        {"shape": "grouped", "rows_per_s": 25000.0},
    ]
    out = storebench.ratio(5000.0, runs)
    assert out["store_vs_driver_ratio"] == 0.2
    assert out["driver_rows_per_s"] == {"single": 4000.0, "grouped": 25000.0}
    assert out["driver_bar"] == "grouped"
    assert storebench.ratio(0.0, runs)["store_vs_driver_ratio"] is None
    assert storebench.ratio(100.0, [])["store_vs_driver_ratio"] is None


def test_offline_recipients_needs_offline_devices_and_counts_acks() -> None:
    with pytest.raises(ConfigError, match="offline-recipients"):
        LoadConfig(offline_recipients=True).validate()
    cfg = LoadConfig(offline_fraction=0.5, offline_recipients=True).validate()
    assert cfg.progress(delivered=0, acked=90) == 90
    assert LoadConfig().progress(delivered=10, acked=90) == 10


def test_relay_config_names_the_keyspace(tmp_path: Path) -> None:
    cass = storebench.bench_config()
    text = storebench.relay_config(tmp_path / "r.toml", cass, tmp_path / "data").read_text()
    assert 'backend = "cassandra"' in text
    assert f'keyspace = "{cass.keyspace}"' in text


@pytest.mark.services
@pytest.mark.integration
def test_both_sides_against_real_cassandra_lose_nothing(tmp_path: Path) -> None:
    if not storebench.reachable("127.0.0.1", 9042):
        message = "Cassandra is not reachable on 127.0.0.1:9042: run `make services`"
        if os.environ.get("RELAY_REQUIRE_SERVICES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with storebench.keyspace(storebench.bench_config()) as cass:
        toml = storebench.relay_config(tmp_path / "relay.toml", cass, tmp_path / "data")
        proc, ep = servers.relayd(tmp_path / "data", config=toml)
        with proc:
            argv = [
                "run", "--target", ep.target, "--keys", ep.keys,
                "--json", str(tmp_path / "report.json"), "--interval", "0.5",
                "--drain-timeout", "60", "--setup-timeout", "60", "--quiet",
                "--devices", "20", "--offline-fraction", "0.5", "--offline-recipients",
                "--rate", "200", "--duration", "2", "--batch", "10",
            ]  # fmt: skip
            code = main(argv)
        rep = json.loads((tmp_path / "report.json").read_text())
        assert code == 0, rep["verdict"]
        recon = rep["reconciliation"]
        assert recon["missing"] == 0
        assert recon["acknowledged"] == recon["delivered_once"] == 400
        # Every envelope went to an offline device: stored, then drained.
        assert rep["latency_ms"]["live"]["count"] == 0
        assert rep["latency_ms"]["store_and_forward"]["count"] == 400
        # Whether the rate was sustained is timing, not correctness: the bench reports it.
        for shape in storebench.SHAPES:
            plan = storebench.DriverPlan(
                keyspace=cass.keyspace, shape=shape, seconds=0.5, warmup_s=0.2, devices=5
            )
            run = storebench.run_driver(plan)
            assert run["lost"] == 0
            assert run["rows_counted"] == run["rows_written"] > 0
            assert run["rows_per_s"] > 0
