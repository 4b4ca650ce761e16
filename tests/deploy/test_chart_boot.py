"""The chart's pods, booted here: what helm renders runs against the real Cassandra and Redis.

The chart is rendered with the local Cassandra and Redis as its external stores and free
ports; the pods' own commands then run as subprocesses: the init container
(``relay.cli.podcert`` with the CA helm generated), the migrations Job, the key directory
and a relay node, with the rendered TOML files and the pods' arguments as they are. Only
the pod's file system is moved into a temporary directory (the paths are rewritten), the
downward API is played by substituting ``$(POD_NAME)`` and ``$(POD_IP)``, and the key
directory's Service name (which the relay node dials) becomes ``127.0.0.1`` through
``--keys-target``, as Kubernetes DNS is not here.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.test_chart import find, render
from tests.process import free_port
from tests.services import CASSANDRA_PORT, REDIS_PORT, require

pytestmark = [pytest.mark.services, pytest.mark.integration]
POD_IP = "127.0.0.1"


def rewrite(text: str, root: Path) -> str:
    """Move the pod's paths under ``root``."""
    for pod_path in ("/etc/relay/", "/run/relay/", "/var/lib/relay"):
        text = text.replace(pod_path, f"{root}{pod_path}")
    return text


def pod_args(container: dict[str, Any], root: Path, pod_name: str) -> list[str]:
    args = [
        a.replace("$(POD_NAME)", pod_name).replace("$(POD_IP)", POD_IP)
        for a in container.get("args", [])
    ]
    return [rewrite(a, root) for a in args]


def run(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )


def serving(target: str, ca: Path, log: Path) -> None:
    """The readiness probe's question (grpc.health.v1, service ""), over TLS with the CA."""
    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(target, creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), wait_for_ready=True, timeout=60
            )
        except grpc.RpcError as exc:
            raise AssertionError(f"{target} not serving: {log.read_text()[-3000:]}") from exc
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def write_volumes(docs: list[dict[str, Any]], root: Path) -> None:
    """The pods' volumes under ``root``: config files, the Secrets' keys, the CA."""
    etc = root / "etc/relay"
    configmap = find(docs, "ConfigMap", "rel-e2ee-relay-config")["data"]
    for name in ("relay.toml", "keyserver.toml"):
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_text(rewrite(configmap[name], root))
    migrate_toml = find(docs, "ConfigMap", "rel-e2ee-relay-migrate")["data"]["migrate.toml"]
    (etc / "migrate.toml").write_text(rewrite(migrate_toml, root))
    for secret, directory in (
        ("rel-e2ee-relay-relay-node-key", "secrets/relay-node-key"),
        ("rel-e2ee-relay-api-keys", "secrets/api-keys"),
        ("rel-e2ee-relay-ca", "ca"),
    ):
        (etc / directory).mkdir(parents=True)
        for key, value in find(docs, "Secret", secret)["data"].items():
            (etc / directory / key).write_bytes(base64.b64decode(value))


def pod_root_args(container: dict[str, Any], root: Path, pod_name: str) -> list[str]:
    """The container's arguments; its config is a copy naming the pod's own tls directory."""
    args = pod_args(container, root, pod_name)
    config = next(a for a in args if a.startswith("--config="))
    text = Path(config.split("=", 1)[1]).read_text()
    own = root / pod_name / "config.toml"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text(text.replace(f"{root}/run/relay/", f"{root / pod_name}/run/relay/"))
    return [a if a != config else f"--config={own}" for a in args]


def issue_certificates(pods: dict[str, dict[str, Any]], root: Path) -> None:
    """Each pod's init container, as the chart runs it (a tls directory per pod)."""
    for pod_name, pod in pods.items():
        (init,) = pod["initContainers"]
        assert init["command"] == ["python", "-m", "relay.cli.podcert"]
        argv = [
            sys.executable,
            "-m",
            "relay.cli.podcert",
            *pod_args(init, root / pod_name, pod_name),
        ]
        argv = [a.replace(f"{root / pod_name}/etc/", f"{root}/etc/") for a in argv]
        subprocess.run(argv, check=True, capture_output=True)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_rendered_pods_boot_on_real_cassandra_and_redis(tmp_path: Path) -> None:
    require("Cassandra", CASSANDRA_PORT)
    require("Redis", REDIS_PORT)
    ports = {k: free_port() for k in ("device", "link", "metrics", "keys", "keys_metrics")}
    # One keyspace per machine, kept: the first run is an install (the Job creates and
    # migrates it), every later one an upgrade (the Job applies what is new, if anything).
    # Dropping it would cost more than the rest of the test on a busy Cassandra.
    keyspace = "helm_chart_boot"
    prefix = f"helm-boot-{secrets.token_hex(4)}:"
    docs = render(
        "",
        "--set",
        f"cassandra.contactPoints={{127.0.0.1}},cassandra.port={CASSANDRA_PORT}",
        "--set",
        f"cassandra.keyspace={keyspace},cassandra.replicationFactor=1",
        "--set",
        "cassandra.requestTimeoutSeconds=30",  # as tests/cassandra: a shared, busy machine
        "--set",
        f"redis.url=redis://127.0.0.1:{REDIS_PORT}/0,redis.keyPrefix={prefix}",
        "--set",
        f"relay.ports.device={ports['device']},relay.ports.link={ports['link']}",
        "--set",
        f"relay.ports.metrics={ports['metrics']},keyserver.ports.grpc={ports['keys']}",
        "--set",
        f"keyserver.ports.metrics={ports['keys_metrics']}",
        "--set",
        "relay.drain.drainDelaySeconds=0,relay.drain.graceSeconds=1,keyserver.drain.drainDelaySeconds=0",
        "--set",
        "apiKeys.keys[0].tenant=default,apiKeys.keys[0].name=billing",
    )
    root = tmp_path / "pod"
    write_volumes(docs, root)

    relay_pod = find(docs, "Deployment", "rel-e2ee-relay-relay")["spec"]["template"]["spec"]
    keys_pod = find(docs, "Deployment", "rel-e2ee-relay-keys")["spec"]["template"]["spec"]
    job_pod = find(docs, "Job", "rel-e2ee-relay-migrate")["spec"]["template"]["spec"]
    relayd = [sys.executable, "-m", "relay.cli.relayd"]
    node_id = "rel-e2ee-relay-relay-5d8f7-x2k9q"
    issue_certificates({node_id: relay_pod, "rel-e2ee-relay-keys-1": keys_pod}, root)

    logs = tmp_path / "logs"
    logs.mkdir()
    (migrate,) = job_pod["containers"]
    done = subprocess.run(
        [*relayd, *pod_args(migrate, root, "migrate")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"migration(s) to keyspace {keyspace}" in done.stdout

    (keys_container,) = keys_pod["containers"]
    (relay_container,) = relay_pod["containers"]
    keys_proc = run(
        [*relayd, *pod_root_args(keys_container, root, "rel-e2ee-relay-keys-1")], logs / "k"
    )
    relay_proc = None
    try:
        keys_ca = root / "rel-e2ee-relay-keys-1/run/relay/tls/ca.crt"
        serving(f"127.0.0.1:{ports['keys']}", keys_ca, logs / "k")
        relay_argv = [
            *relayd,
            *pod_root_args(relay_container, root, node_id),
            f"--keys-target=127.0.0.1:{ports['keys']}",
        ]
        relay_proc = run(relay_argv, logs / "r")
        relay_ca = root / node_id / "run/relay/tls/ca.crt"
        serving(f"127.0.0.1:{ports['device']}", relay_ca, logs / "r")
        # node.link_advertise: the pod IP and link port, published in presence.
        r = redis.Redis(port=REDIS_PORT)
        try:
            advertised = r.get(f"{prefix}node:{node_id}")
        finally:
            r.close()
        assert advertised == f"{POD_IP}:{ports['link']}".encode()
        # metrics.listen: HTTPS on 0.0.0.0, with the pod's certificate.
        context = ssl.create_default_context(cafile=str(relay_ca))
        url = f"https://127.0.0.1:{ports['metrics']}/metrics"
        with urllib.request.urlopen(url, context=context, timeout=30) as reply:
            assert b"relay_sessions" in reply.read()
    finally:
        codes = [stop(p) for p in (relay_proc, keys_proc) if p is not None]
    assert codes == [0, 0], (logs / "r").read_text()[-2000:] + (logs / "k").read_text()[-2000:]
