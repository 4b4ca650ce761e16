"""10,000 messages between 50 SDK devices spread over 3 relay nodes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.cluster.traffic import Traffic

pytestmark = [pytest.mark.services, pytest.mark.integration]


@pytest.mark.timeout(600)  # 10,000 durable messages on 2 shared cores
async def test_10k_messages_exactly_once_fifo_per_pair(cluster: Cluster, tmp_path: Path) -> None:
    addresses = cluster.addresses
    traffic = Traffic(
        cluster.keys_address,
        tmp_path / "devices",
        lambda i: [addresses[(i + k) % 3] for k in range(3)],
    )
    try:
        await traffic.start()
        started = time.monotonic()
        await traffic.send(10_000)
        await traffic.wait_delivered(75)
        elapsed = time.monotonic() - started
        assert traffic.check() == 10_000
        print(f"10,000 messages over 3 nodes delivered in {elapsed:.1f} s")
    finally:
        await traffic.close()
