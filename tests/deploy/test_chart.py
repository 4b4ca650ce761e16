"""The helm chart, rendered by the real helm: every config it renders is one relayd loads.

``helm template`` runs for the default values, values-dev.yaml and
values-production.yaml; each rendered TOML (relay nodes, key directory, migrations Job)
goes through ``relay.config.load``, and the pods' ports, probes, mounts, flags and
termination grace are checked against what that configuration says. (Schema validation
of the manifests is ``make helm-check``: scripts/tools/helm_check.py.)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.common.grpcserver import SHUTDOWN_MARGIN_SECONDS
from relay.config import Config, load

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "e2ee-relay"
VALUES = ["", "values-dev.yaml", "values-production.yaml"]


@cache
def helm() -> str:
    """The pinned helm (built once by scripts/tools/helm.sh, cached)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/tools/helm.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def render(values: str = "", *extra: str) -> list[dict[str, Any]]:
    cmd = [helm(), "template", "rel", str(CHART), "--namespace", "ns"]
    if values:
        cmd += ["-f", str(CHART / values)]
    out = subprocess.run([*cmd, *extra], check=False, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {[d['metadata']['name'] for d in docs]}")


def config_of(docs: list[dict[str, Any]], configmap: str, key: str, tmp: Path) -> Config:
    """The TOML ``key`` of ConfigMap ``configmap``, through the real loader."""
    path = tmp / key
    path.write_text(find(docs, "ConfigMap", configmap)["data"][key])
    return load(path)


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def container_port(container: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == name)


def file_paths(config: Config) -> list[str]:
    """Every file a relayd with ``config`` reads."""
    c, p, t = config.cassandra, config.presence, config.tls
    paths = [
        config.keyserver.relay_key_file,
        c.password_file,
        c.ssl_ca_file,
        c.ssl_cert_file,
        c.ssl_key_file,
        p.redis_ca_file,
        p.redis_cert_file,
        p.redis_key_file,
        t.cert_file,
        t.key_file,
        t.client_ca_file,
        t.ca_file,
    ]
    paths += [k.key_file for k in config.api_keys]
    paths += [tenant.token_public_key_file for tenant in config.keyserver.tenants]
    return [path for path in paths if path]


def assert_mounted(pod: dict[str, Any], container: dict[str, Any], paths: list[str]) -> None:
    """Each of ``paths`` lies under one of the container's mounts, from a real volume."""
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = container["volumeMounts"]
    for path in paths:
        under = [
            m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
        ]
        assert under, f"{container['name']}: {path} is on no volume mount"
        assert under[0]["name"] in volumes


@pytest.mark.parametrize("values", VALUES)
def test_rendered_configs_load_and_match_the_pods(values: str, tmp_path: Path) -> None:
    docs = render(values)
    relay_cfg = config_of(docs, "rel-e2ee-relay-config", "relay.toml", tmp_path)
    keys_cfg = config_of(docs, "rel-e2ee-relay-config", "keyserver.toml", tmp_path)
    migrate_cfg = config_of(docs, "rel-e2ee-relay-migrate", "migrate.toml", tmp_path)
    for cfg in (relay_cfg, keys_cfg, migrate_cfg):
        assert cfg.storage.backend == "cassandra"
    assert keys_cfg.cassandra == relay_cfg.cassandra
    # The same cluster and keyspace; only the Job's statements may take longer.
    assert migrate_cfg.cassandra == dataclasses.replace(
        relay_cfg.cassandra, request_timeout_seconds=60.0
    )
    assert relay_cfg.presence == keys_cfg.presence
    assert relay_cfg.presence.backend == "redis"
    assert relay_cfg.tls.enabled and keys_cfg.tls.enabled
    assert relay_cfg.keyserver.relay_key_file == keys_cfg.keyserver.relay_key_file
    assert relay_cfg.api_keys == keys_cfg.api_keys

    relay_dep = find(docs, "Deployment", "rel-e2ee-relay-relay")
    pod = relay_dep["spec"]["template"]["spec"]
    (relay,) = pod["containers"]
    assert relay["args"][:2] == ["relay", "--config=/etc/relay/relay.toml"]
    assert "--node-id=$(POD_NAME)" in relay["args"]
    link = container_port(relay, "link")
    assert f"--link-advertise=$(POD_IP):{link}" in relay["args"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in relay["env"][:2]}
    assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
    assert port(relay_cfg.node.listen) == container_port(relay, "device")
    assert port(relay_cfg.node.link_listen) == link
    assert relay_cfg.node.link_listen.startswith("0.0.0.0:")
    metrics = relay_cfg.metrics.endpoint("relay")
    assert metrics is not None and metrics[1] == f"0.0.0.0:{container_port(relay, 'metrics')}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = relay[probe]["exec"]["command"]
        assert command[0] == "grpc_health_probe"
        assert f"-addr=127.0.0.1:{port(relay_cfg.node.listen)}" in command
    # SIGTERM -> drain delay -> grace -> relayd's shutdown margin, after the preStop sleep.
    pre_stop = relay["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = (
        pre_stop
        + relay_cfg.node.drain_delay_seconds
        + relay_cfg.node.grace_seconds
        + SHUTDOWN_MARGIN_SECONDS
    )
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert_mounted(pod, relay, file_paths(relay_cfg))
    (init,) = pod["initContainers"]
    assert "--node-id=$(POD_NAME)" in init["args"] and "--host=$(POD_IP)" in init["args"]
    assert "--out=/run/relay/tls" in init["args"]


@pytest.mark.parametrize("values", VALUES)
def test_key_directory_and_migrations_match_their_configs(values: str, tmp_path: Path) -> None:
    docs = render(values)
    relay_cfg = config_of(docs, "rel-e2ee-relay-config", "relay.toml", tmp_path)
    keys_cfg = config_of(docs, "rel-e2ee-relay-config", "keyserver.toml", tmp_path)
    migrate_cfg = config_of(docs, "rel-e2ee-relay-migrate", "migrate.toml", tmp_path)

    keys_dep = find(docs, "Deployment", "rel-e2ee-relay-keys")
    keys_pod = keys_dep["spec"]["template"]["spec"]
    (keys,) = keys_pod["containers"]
    assert port(keys_cfg.keyserver.listen) == container_port(keys, "grpc")
    keys_needed = (
        keys_cfg.node.drain_delay_seconds + keys_cfg.node.grace_seconds + SHUTDOWN_MARGIN_SECONDS
    )
    assert keys_pod["terminationGracePeriodSeconds"] >= keys_needed
    assert_mounted(keys_pod, keys, file_paths(keys_cfg))
    keys_metrics = keys_cfg.metrics.endpoint("keyserver")
    assert keys_metrics is not None
    assert port(keys_metrics[1]) == container_port(keys, "metrics")
    # Relay nodes dial the key directory's Service, which the key directory's pods' own
    # certificates name.
    target_host = relay_cfg.keyserver.target.rsplit(":", 1)[0]
    assert target_host == "rel-e2ee-relay-keys.ns.svc.cluster.local"
    assert f"--host={target_host}" in keys_pod["initContainers"][0]["args"]
    service = find(docs, "Service", "rel-e2ee-relay-keys")
    assert port(relay_cfg.keyserver.target) == service["spec"]["ports"][0]["port"]

    job = find(docs, "Job", "rel-e2ee-relay-migrate")
    job_pod = job["spec"]["template"]["spec"]
    (migrate,) = job_pod["containers"]
    assert migrate["args"][0] == "migrate"
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert_mounted(job_pod, migrate, file_paths(migrate_cfg))


def test_values_reach_the_config_with_their_types(tmp_path: Path) -> None:
    docs = render(
        "",
        "--set",
        "config.limits.max_envelope_bytes=131072",
        "--set",
        "config.presence.cache_seconds=0.5",
        "--set-string",
        "relay.config.node.grace_seconds=7",
        "--set-json",
        'keyserver.config.keyserver={"low_water_mark": 4}',
        "--set",
        "cassandra.contactPoints={a.example,b.example}",
        "--set",
        "cassandra.username=relay,cassandra.password=pw",
    )
    with pytest.raises(Exception, match=r"node\.grace_seconds: expected float, got str"):
        config_of(docs, "rel-e2ee-relay-config", "relay.toml", tmp_path)
    docs = render(
        "values-production.yaml",
        "--set",
        "config.limits.max_envelope_bytes=131072",
        # `--set` passes 0.5 as a string (helm parses only integers and booleans):
        # floats go in a values file or through --set-json.
        "--set-json",
        "config.presence.cache_seconds=0.5",
        "--set-json",
        'keyserver.config.keyserver={"low_water_mark": 4}',
        "--set",
        "cassandra.contactPoints={a.example,b.example}",
    )
    relay_cfg = config_of(docs, "rel-e2ee-relay-config", "relay.toml", tmp_path)
    keys_cfg = config_of(docs, "rel-e2ee-relay-config", "keyserver.toml", tmp_path)
    assert relay_cfg.limits.max_envelope_bytes == 131072
    assert relay_cfg.presence.cache_seconds == 0.5
    assert relay_cfg.cassandra.contact_points == ("a.example", "b.example")
    assert relay_cfg.cassandra.password_file == "/etc/relay/secrets/cassandra/password"
    assert relay_cfg.cassandra.ssl_ca_file == "/etc/relay/cassandra-tls/ca.crt"
    assert relay_cfg.presence.redis_url.startswith("rediss://")
    assert keys_cfg.keyserver.low_water_mark == 4
    assert keys_cfg.keyserver.default_registration == "closed"
    (tenant,) = keys_cfg.keyserver.tenants
    assert tenant.registration == "token"
    pub = find(docs, "ConfigMap", "rel-e2ee-relay-tenants")["data"]["acme.pub"]
    assert len(bytes.fromhex(pub)) == 32
    assert tenant.token_public_key_file == "/etc/relay/tenants/acme.pub"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "tls.mode=none"], "/tls/mode': value must be one of 'selfSigned'"),
        # values.schema.json: a misspelt key is an error, not silently ignored.
        (["--set", "relay.drian.preStopSeconds=5"], "additional properties 'drian'"),
        (["--set", "relay.ports.device=0"], "/relay/ports/device"),
        (["--set", "tls.mode=existingCA"], "tls.existingCASecret"),
        (["--set", "cassandra.username=relay"], "cassandra.password"),
        (
            [
                "--set",
                "keyserver.registration.tenants[0].name=acme",
                "--set",
                "keyserver.registration.tenants[0].registration=token",
            ],
            "tokenPublicKey",
        ),
    ],
)
def test_wrong_values_fail_with_the_value_named(flags: list[str], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        render("", *flags)


def test_dev_values_run_stores_in_the_release(tmp_path: Path) -> None:
    docs = render("values-dev.yaml")
    cfg = config_of(docs, "rel-e2ee-relay-config", "relay.toml", tmp_path)
    assert cfg.cassandra.contact_points == ("rel-e2ee-relay-cassandra",)
    assert cfg.cassandra.replication_factor == 1
    assert cfg.presence.redis_url == "redis://rel-e2ee-relay-redis:6379/0"
    find(docs, "StatefulSet", "rel-e2ee-relay-cassandra")
    find(docs, "StatefulSet", "rel-e2ee-relay-redis")
    job = find(docs, "Job", "rel-e2ee-relay-migrate")
    # Cassandra is part of the release: the schema can only be applied after install.
    assert job["metadata"]["annotations"]["helm.sh/hook"].startswith("post-install")
    secret = find(docs, "Secret", "rel-e2ee-relay-api-keys")
    key = base64.b64decode(secret["data"]["default.demo"]).decode()
    assert len(key) >= 32


def test_link_advertise_flag_sets_the_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    # The relay pods pass --link-advertise=$(POD_IP):PORT (no env expansion in the TOML).
    from relay.cli import relayd

    assert relayd.main(["config", "--node-id", "pod-1", "--link-advertise", "10.1.2.3:50053"]) == 0
    node = json.loads(capsys.readouterr().out)["node"]
    assert node["id"] == "pod-1"
    assert node["link_advertise"] == "10.1.2.3:50053"
