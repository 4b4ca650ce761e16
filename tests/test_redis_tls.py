"""Redis over TLS (``rediss://``): the TLS-only Redis of `make services` on REDIS_TLS_PORT.

It verifies client certificates when one is presented (``--tls-auth-clients
optional``), so a CA alone works, the dev client certificate works, and a client
certificate of another CA is refused: proof that the configured one is sent.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from relay.common.devcerts import make_dev_certs
from relay.common.device_events import RedisDeviceEvents
from relay.config import PresenceConfig
from relay.errors import Unavailable
from relay.model import Address, Location
from relay.stores.redis_presence import RedisPresence
from tests.services import REDIS_TLS_PORT, REDIS_TLS_URL, TLS_DIR, require_tls

pytestmark = pytest.mark.services
BOB = Address("t", "bob", 1)
NOW = 1_700_000_000_000
WHERE = f"127.0.0.1:{REDIS_TLS_PORT}"
#: No TLS failure may take longer than this (socket timeouts are 2 s, a few retries).
BOUND_SECONDS = 30.0


@pytest.fixture(autouse=True)
def _redis_tls() -> None:
    require_tls("Redis over TLS", REDIS_TLS_PORT)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second dev CA (same names, other keys) and its client certificate."""
    directory = tmp_path_factory.mktemp("other-ca")
    make_dev_certs(directory, node_ids=())
    return directory


def config(**overrides: Any) -> PresenceConfig:
    settings: dict[str, Any] = {
        "backend": "redis",
        "redis_url": REDIS_TLS_URL,
        "redis_ca_file": str(TLS_DIR / "ca.pem"),
        "key_prefix": f"t-{uuid.uuid4().hex[:8]}:",
        "cache_seconds": 0.0,
    }
    settings.update(overrides)
    return PresenceConfig(**settings)


async def claim_and_locate(cfg: PresenceConfig) -> None:
    async with asyncio.timeout(BOUND_SECONDS), RedisPresence(cfg) as presence:
        await presence.heartbeat("n1", "127.0.0.1:1", [])
        epoch, previous = await presence.claim(BOB, "n1", NOW)
        assert previous is None
        assert await presence.locate([BOB]) == {BOB: Location("n1", epoch)}
        await presence.release(BOB, "n1", epoch)
        assert await presence.locate([BOB]) == {}


async def failure(cfg: PresenceConfig) -> str:
    async with asyncio.timeout(BOUND_SECONDS), RedisPresence(cfg) as presence:
        with pytest.raises(Unavailable) as info:
            await presence.claim(BOB, "n1", NOW)
    message = str(info.value)
    assert f"Redis at {WHERE}" in message
    return message


async def test_presence_over_tls_with_the_dev_ca() -> None:
    await claim_and_locate(config())


async def test_presence_over_tls_with_a_client_certificate() -> None:
    await claim_and_locate(
        config(
            redis_cert_file=str(TLS_DIR / "client.pem"),
            redis_key_file=str(TLS_DIR / "client.key"),
        )
    )


async def test_wrong_ca_says_which_certificate_did_not_verify(other_ca: Path) -> None:
    wrong = str(other_ca / "ca.pem")
    message = await failure(config(redis_ca_file=wrong))
    assert f"the server certificate of {WHERE} did not verify against the CA in {wrong}" in message
    assert "presence.redis_ca_file" in message


async def test_no_ca_means_the_system_roots() -> None:
    message = await failure(config(redis_ca_file=""))
    assert "did not verify against the system roots" in message


async def test_untrusted_client_certificate_is_presented_and_refused(other_ca: Path) -> None:
    cert = str(other_ca / "client.pem")
    message = await failure(
        config(redis_cert_file=cert, redis_key_file=str(other_ca / "client.key"))
    )
    # "refused the handshake (...)", or a reset when the server closed before its alert
    assert f"does it trust the client certificate {cert}" in message


async def test_device_events_over_tls() -> None:
    cfg = config()
    events = RedisDeviceEvents.from_config(cfg)
    seen: asyncio.Queue[Address] = asyncio.Queue()

    async def listener(device: Address) -> None:
        await seen.put(device)

    try:
        async with asyncio.timeout(BOUND_SECONDS), events.subscribe(listener):
            await events.device_removed(BOB)
            assert await seen.get() == BOB
    finally:
        await events.close()


async def test_device_events_wrong_ca_logs_the_reason(
    other_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = RedisDeviceEvents.from_config(config(redis_ca_file=str(other_ca / "ca.pem")))
    try:
        async with asyncio.timeout(BOUND_SECONDS):
            await events.device_removed(BOB)  # logged, not raised
    finally:
        await events.close()
    assert "did not verify against the CA in" in caplog.text
