"""Config spreads, ladders and profile parsing (pure functions)."""

from __future__ import annotations

import itertools

import pytest

from loadtest.config import ConfigError, LoadConfig
from loadtest.profiling import hot_spots
from loadtest.sweep import geometric, highest_within, saturation, step_spec


def test_offline_fraction_is_spread_evenly() -> None:
    cfg = LoadConfig(devices=100, offline_fraction=0.25)
    offline = [d for d in range(100) if cfg.is_offline(d)]
    assert len(offline) == 25
    assert max(b - a for a, b in itertools.pairwise(offline)) == 4


def test_devices_spread_over_workers_and_nodes() -> None:
    cfg = LoadConfig(devices=8, workers=2, targets=("a:1", "b:2"), keys=("k:1", "k:2"))
    assert [cfg.owner_of(d) for d in range(8)] == [0, 1] * 4
    # Each worker gets devices on both nodes.
    assert {cfg.node_of(d) for d in range(8) if cfg.owner_of(d) == 0} == {0, 1}
    assert cfg.key_target(1) == "k:2"


@pytest.mark.parametrize(
    "change",
    [{"devices": 1}, {"batch": 0}, {"fanout": 60}, {"offline_fraction": 1.0}, {"keys": ("a", "b")}],
)
def test_config_rejects(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LoadConfig(**change).validate()  # type: ignore[arg-type]


def test_ladder() -> None:
    assert geometric(100, 2, 1000) == [100, 200, 400, 800]
    assert step_spec([100, 200], 3) == "step:100,200@3"
    steps = [
        {"rate": 100, "delivered_per_s": 100, "sustained": True, "latency_ms": {"p99": 2}},
        {"rate": 200, "delivered_per_s": 200, "sustained": True, "latency_ms": {"p99": 20}},
        {"rate": 400, "delivered_per_s": 390, "sustained": True, "latency_ms": {"p99": 9}},
        {"rate": 800, "delivered_per_s": 500, "sustained": False, "latency_ms": {"p99": 2}},
    ]
    best = highest_within(steps, 10)
    assert best is not None and best["rate"] == 400
    sat = saturation(steps)
    assert sat is not None and sat["rate"] == 800


def test_hot_spots() -> None:
    raw = "\n".join(
        [
            "thread (0x1): MainThread;main (app.py:1);send (relay/core/delivery.py:10) 60",
            "thread (0x1): MainThread;main (app.py:1);read (relay/core/sessions.py:5) 20",
            "thread (0x2): sqlite-w-queue.db_0;_commit (relay/stores/sqlite_worker.py:9) 20",
        ]
    )
    spots = hot_spots(raw)
    assert spots["samples"] == 100
    assert spots["self"][0] == {
        "function": "send (relay/core/delivery.py)",
        "samples": 60,
        "pct": 60.0,
    }
    assert spots["inclusive"][0]["function"] == "main (app.py)"
    assert spots["inclusive"][0]["pct"] == 80.0
    assert {t["function"] for t in spots["threads"]} == {"MainThread", "sqlite-w-queue.db"}
