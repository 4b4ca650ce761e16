"""Real Redis and Cassandra for integration tests (started by `make services`)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "services" / "services.sh"
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
CASSANDRA_PORT = int(os.environ.get("CASSANDRA_PORT", "9042"))
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
#: The TLS-only Redis and Cassandra port of `make services` (SERVICES_TLS=1, the default).
REDIS_TLS_PORT = int(os.environ.get("REDIS_TLS_PORT", "6380"))
CASSANDRA_TLS_PORT = int(os.environ.get("CASSANDRA_TLS_PORT", "9142"))
REDIS_TLS_URL = f"rediss://127.0.0.1:{REDIS_TLS_PORT}/0"


def _run_dir() -> Path:
    cache = Path(os.environ.get("RELAY_CACHE_DIR") or Path.home() / ".cache" / "e2ee-relay")
    return Path(os.environ.get("RELAY_RUN_DIR") or cache / "run")


#: The dev certificates services.sh made for them: ca.pem, client.pem/.key, ...
TLS_DIR = Path(os.environ.get("RELAY_TLS_DIR") or _run_dir() / "tls")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require(name: str, port: int) -> None:
    """Skip (or fail, under RELAY_REQUIRE_SERVICES=1 as in `make test`) without ``name``."""
    if listening(port):
        return
    message = f"{name} is not running on 127.0.0.1:{port}: run `make services`"
    if os.environ.get("RELAY_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_tls(name: str, port: int) -> None:
    """Like :func:`require`, for a TLS port: its dev certificates must be there too."""
    require(name, port)
    if not (TLS_DIR / "ca.pem").is_file():
        message = f"no dev certificates in {TLS_DIR} for {name}: run `make services`"
        if os.environ.get("RELAY_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)


def control(command: str) -> None:
    """Run ``services.sh COMMAND`` (e.g. stop-redis), raising with its output on failure."""
    done = subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=240, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"services.sh {command} failed:\n{done.stdout}\n{done.stderr}")
