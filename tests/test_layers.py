"""The core imports no transport or driver: servicers translate, the core decides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = (
    "grpc",
    "grpc_status",
    "google.protobuf",
    "relaypb",
    "cassandra",
    "redis",
    "prometheus_client",
    "relay.metrics",  # the core counts through relay.core.ports.CoreMetrics
)
CORE = [
    *sorted((ROOT / "relay" / "core").glob("*.py")),
    ROOT / "relay" / "model.py",
    ROOT / "relay" / "errors.py",
    ROOT / "keyserver" / "directory.py",
    ROOT / "keyserver" / "linking.py",
    ROOT / "keyserver" / "lists.py",
    ROOT / "keyserver" / "quotas.py",
    ROOT / "keyserver" / "tokens.py",
    ROOT / "keyserver" / "ports.py",
    ROOT / "keyserver" / "model.py",
    ROOT / "relay" / "accounts.py",
]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_transport_or_driver(path: Path) -> None:
    bad = {n for n in imported(path) if n.split(".")[0] in FORBIDDEN or n.startswith(FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from grpc import aio\nimport relay.model\n")
    assert "grpc" in imported(sample)


KEYSERVER = sorted((ROOT / "keyserver").glob("*.py"))
RELAY = sorted(p for p in (ROOT / "relay").rglob("*.py") if p.name != "relayd.py")
#: The relay's own server and store modules: the key directory imports relay.common instead.
RELAY_PRIVATE = ("relay.server", "relay.stores")
#: The key directory's server and store modules (its composition root is relayd's business).
KEYSERVER_PRIVATE = (
    "keyserver.app",
    "keyserver.servicer",
    "keyserver.directory",
    "keyserver.sqlite_store",
    "keyserver.cassandra_store",
    "keyserver.cassandra_accounts",
    "keyserver.cassandra_base",
    "keyserver.linking",
)


def _reaches(names: set[str], private: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in private)}


@pytest.mark.parametrize("path", KEYSERVER, ids=lambda p: str(p.relative_to(ROOT)))
def test_keyserver_does_not_reach_into_relay_servers_or_stores(path: Path) -> None:
    bad = _reaches(imported(path), RELAY_PRIVATE)
    assert not bad, f"{path.name} imports {sorted(bad)}: move the shared part to relay.common"


@pytest.mark.parametrize("path", RELAY, ids=lambda p: str(p.relative_to(ROOT)))
def test_relay_does_not_reach_into_keyserver_servers_or_stores(path: Path) -> None:
    bad = _reaches(imported(path), KEYSERVER_PRIVATE)
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_reach_check_catches_a_private_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from relay.server.status import unary\nfrom relay.common import status\n")
    assert _reaches(imported(sample), RELAY_PRIVATE) == {"relay.server.status"}
