"""docker-compose.yml: there is no Docker engine here (nor `docker compose`), so the file
is read as YAML and checked for what `docker compose up` needs: its services and their
order, every config it mounts loaded by relayd's own loader, every file those configs
name on a mounted volume, node links and certificates that agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import Config, load
from tests.deploy.test_chart import file_paths

ROOT = Path(__file__).resolve().parents[2]
RELAYD = {"certs", "migrate", "keys", "relay-1", "relay-2"}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(compose["services"])


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume; ``:ro`` dropped."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]  # type: ignore[misc]


def config(service: dict[str, Any]) -> Config:
    """The config file the service's command names, loaded from the file it mounts there."""
    command = service["command"]
    target = command[command.index("--config") + 1]
    (source,) = [s for s, t in mounts(service) if t == target]
    assert source.startswith("./"), source
    return load(ROOT / source)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_services_and_their_order(services: dict[str, Any]) -> None:
    assert set(services) == {"cassandra", "redis", *RELAYD}
    for name in ("cassandra", "redis"):
        assert services[name]["healthcheck"]["test"]
    assert services["migrate"]["depends_on"] == {"cassandra": {"condition": "service_healthy"}}
    for name in ("keys", "relay-1", "relay-2"):
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["certs"] == {"condition": "service_completed_successfully"}
        assert deps["redis"] == {"condition": "service_healthy"}
    for name in RELAYD:
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["certs"]["image"]
    assert services["relay-1"]["command"][0] == "relay"
    assert services["keys"]["command"][0] == "keyserver"
    assert services["migrate"]["command"][0] == "migrate"


def test_every_mounted_config_loads_and_its_files_are_mounted(services: dict[str, Any]) -> None:
    for name in RELAYD - {"certs"}:
        service = services[name]
        for source, _ in mounts(service):
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name}: {source} does not exist"
        cfg = config(service)
        assert cfg.storage.backend == "cassandra"
        assert cfg.cassandra.contact_points == ("cassandra",)
        targets = [t for _, t in mounts(service)]
        for path in file_paths(cfg):
            assert any(path.startswith(t + "/") for t in targets), f"{name}: {path} unmounted"


def test_nodes_links_keys_and_certificates_agree(services: dict[str, Any]) -> None:
    relays = {name: config(services[name]) for name in ("relay-1", "relay-2")}
    keys = config(services["keys"])
    certs_command = " ".join(services["certs"]["command"])
    nodes = int(re.search(r"--nodes (\d+)", certs_command).group(1))  # type: ignore[union-attr]
    hosts = set(re.findall(r"--host (\S+)", certs_command))
    assert {c.node.id for c in relays.values()} == {f"relay-{i}" for i in range(1, nodes + 1)}
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert exposed is not None
    ports = {int(p) for p in exposed.group(1).split()}
    for name, cfg in relays.items():
        # Peers dial the advertised link address: this service, its link port, and a
        # certificate that names the host and the node id.
        host, link_port = host_port(cfg.node.link_advertise)
        assert host == name and host in hosts
        assert link_port == host_port(cfg.node.link_listen)[1]
        assert cfg.tls.cert_file.endswith(f"/node-{cfg.node.id}.pem")
        assert cfg.tls.client_ca_file, "node links between hosts are mutual TLS"
        target_host, target_port = host_port(cfg.keyserver.target)
        assert target_host == "keys" and target_host in hosts
        assert target_port == host_port(keys.keyserver.listen)[1]
        assert cfg.keyserver.relay_key_file == keys.keyserver.relay_key_file
        assert cfg.presence == keys.presence
        assert cfg.presence.backend == "redis" and "//redis:" in cfg.presence.redis_url
        assert {host_port(cfg.node.listen)[1], link_port} <= ports
    assert host_port(keys.keyserver.listen)[1] in ports
