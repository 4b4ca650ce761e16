"""A few seconds of real load against ``relayd run`` and the forwarder: nothing lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import servers
from loadtest.cli import main
from loadtest.report import REPORT_KEYS
from tests.process import Relayd

pytestmark = pytest.mark.integration


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator[Relayd]:
    proc = Relayd(tmp_path / "data")
    yield proc
    proc.stop()


def run_args(target: str, keys: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run", "--target", target, "--keys", keys,
        "--json", str(tmp_path / "report.json"), "--plot", str(tmp_path / "report.png"),
        "--interval", "0.5", "--drain-timeout", "30", "--setup-timeout", "60", "--quiet",
        *extra,
    ]  # fmt: skip


async def test_smoke_against_relayd_loses_nothing(relayd: Relayd, tmp_path: Path) -> None:
    await relayd.start()
    argv = run_args(
        relayd.relay_address, relayd.keys_address, tmp_path,
        "--devices", "30", "--offline-fraction", "0.2", "--workers", "2",
        "--rate", "300", "--duration", "3", "--batch", "10", "--fanout", "3",
    )  # fmt: skip
    code = await asyncio.to_thread(main, argv)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, rep["verdict"]
    assert set(REPORT_KEYS) <= set(rep)
    recon = rep["reconciliation"]
    assert recon["ok"] is True
    assert recon["missing"] == 0
    assert recon["duplicated"] == 0
    assert recon["unexpected"] == 0
    assert recon["acknowledged"] == rep["totals"]["offered"] == 900
    assert recon["delivered_once"] == 900
    # Offline devices came online at the end and drained what was stored for them.
    assert rep["latency_ms"]["store_and_forward"]["count"] > 0
    assert (
        rep["latency_ms"]["live"]["count"] + rep["latency_ms"]["store_and_forward"]["count"] == 900
    )
    assert {"p50", "p90", "p99", "p999", "max"} <= set(rep["latency_ms"]["live"])
    assert rep["errors"] == {}
    assert (tmp_path / "report.png").stat().st_size > 10_000


async def test_smoke_against_the_forwarder(tmp_path: Path) -> None:
    proc, ep = servers.forwarder(tmp_path)
    with proc:
        argv = run_args(
            ep.target, ep.keys, tmp_path,
            "--devices", "20", "--schedule", "step:200,400@1", "--batch", "5",
        )  # fmt: skip
        code = await asyncio.to_thread(main, argv)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, rep["verdict"]
    assert rep["reconciliation"]["delivered_once"] == 600
    assert [s["rate"] for s in rep["steps"]] == [200, 400]
