"""TLS on every hop, with real handshakes: dev certificates, relayctl, rotation, the rules.

Servers run in-process on port 0 (``relayd run`` as a subprocess for SIGHUP) with
certificates from ``relay.common.devcerts`` in ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from keyserver.app import KeyserverApp
from relay.cli import relayd
from relay.common import tls
from relay.common.devcerts import DevCerts, make_dev_certs
from relay.common.metrics_http import MetricsEndpoint, start_metrics_server
from relay.config import ApiKeyConfig, Config, ConfigError
from relay.errors import TlsFailure, Unauthenticated
from relay.model import Address
from relay.sdk import (
    DeviceState,
    ExponentialBackoff,
    KeyDirectoryClient,
    RelayClient,
    register_device,
)
from relay.sdk.channels import endpoint, open_channel
from relay.server.app import RelayApp
from relaypb.relay.v1 import relay_pb2, relay_pb2_grpc
from tests.conftest import Servers, StartServers
from tests.conftest import test_config as config_in
from tests.process import Relayd, free_port
from tests.sdk.test_cli import RELAYCTL, Result, env, finish

pytestmark = pytest.mark.integration

TIMEOUT = 60
API_KEY = "tls-test-api-key-of-the-billing-service-0123456789"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> DevCerts:
    """A dev CA and certificates (node relay-1, key directory, client)."""
    return make_dev_certs(tmp_path / "certs")


def tls_overrides(cert: Path, key: Path, ca: Path) -> dict[str, str]:
    """Config overrides: serve ``cert``/``key``, verify the key directory with ``ca``."""
    return {"tls.cert_file": str(cert), "tls.key_file": str(key), "tls.ca_file": str(ca)}


@pytest.fixture
async def tls_servers(start_servers: StartServers, certs: DevCerts) -> Servers:
    """Relay node and key directory over TLS with the dev certificates."""
    node = certs.nodes["relay-1"]
    return await start_servers(**tls_overrides(node.cert, node.key, certs.ca))


def served_certificate(port: int, ca: Path, host: str = "127.0.0.1") -> bytes:
    """The DER certificate a new TLS connection to ``host:port`` gets (verified by ``ca``)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def replace_file(src: Path, dst: Path) -> None:
    """Put a copy of ``src`` at ``dst`` in one step (a reader sees old or new, never half)."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def lan_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ipaddress.ip_address(ip).is_loopback else ip


async def ctl(servers: Servers, home: Path, *args: str) -> Result:
    """One relayctl process against ``servers``."""
    return await finish(await spawn(servers, home, *args))


async def spawn(servers: Servers, home: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        RELAYCTL,
        "--home",
        str(home),
        *args,
        env=env(servers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def one_error_line(result: Result) -> str:
    assert result.code == 1, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relayctl: error: "), result.err
    return lines[0]


async def register(keys: str, ca: Path, home: Path, user: str) -> Address:
    """A new device of a new ``user`` in ``home``, registered over TLS."""
    with DeviceState.open(home) as state:
        async with open_channel(keys, tls_ca=str(ca)) as channel:
            return await register_device(state, KeyDirectoryClient(channel), "default", user)


# -- the README exchange ---------------------------------------------------------------


async def test_readme_exchange_over_tls(
    tls_servers: Servers, certs: DevCerts, tmp_path: Path
) -> None:
    ca = str(certs.ca)
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for home, user in ((bob, "bob"), (alice, "alice")):
        result = await ctl(tls_servers, home, "--tls-ca", ca, "init", user)
        assert result.out == f"registered default/{user}/1 (home {home})\n", result.err
    listen = await spawn(
        tls_servers, bob, "--tls-ca", ca, "listen", "--count", "1", "--timeout", str(TIMEOUT)
    )
    assert listen.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        ready = await listen.stderr.readline()
    assert ready.decode().startswith("listening as default/bob/1"), ready
    sent = await ctl(tls_servers, alice, "--tls-ca", ca, "send", "bob", "hello over TLS")
    assert sent.code == 0, sent.err
    result = await finish(listen)
    assert (result.code, result.out) == (0, "alice/1: hello over TLS\n"), result.err


async def test_plaintext_client_against_the_tls_port_fails_clearly(
    tls_servers: Servers, tmp_path: Path
) -> None:
    line = one_error_line(await ctl(tls_servers, tmp_path / "bob", "init", "bob"))
    assert f"key directory {tls_servers.keys_address} closed the plaintext connection" in line
    assert "if it serves TLS" in line and "--tls-ca FILE" in line
    assert "make run" not in line  # not the "is it running?" hint


async def test_tls_client_against_a_plaintext_port_says_so(servers: Servers) -> None:
    async with open_channel(servers.keys_address, tls=True) as channel:
        directory = KeyDirectoryClient(
            channel, target=endpoint("key directory", servers.keys_address, tls=True)
        )
        with pytest.raises(TlsFailure, match=r"does not speak TLS.*serves plaintext"):
            await directory.list_devices("default", "bob")


# -- certificates that do not verify -----------------------------------------------------


async def test_wrong_ca_names_the_certificate_and_the_ca(
    tls_servers: Servers, certs: DevCerts, tmp_path: Path
) -> None:
    other = make_dev_certs(tmp_path / "other")
    result = await ctl(tls_servers, tmp_path / "bob", "--tls-ca", str(other.ca), "init", "bob")
    line = one_error_line(result)
    assert (
        f"the TLS certificate of key directory {tls_servers.keys_address} did not verify "
        f"against the CA in {other.ca}"
    ) in line
    # The relay's own port, through the SDK: the same words once the backoff gives up.
    await register(tls_servers.keys_address, certs.ca, tmp_path / "alice", "alice")
    with DeviceState.open(tmp_path / "alice") as state:
        client = RelayClient(
            state,
            tls_servers.relay_address,
            tls_ca=str(other.ca),
            backoff=ExponentialBackoff(max_attempts=0),
        )
        expected = (
            f"the TLS certificate of relay {tls_servers.relay_address} did not verify "
            f"against the CA in {other.ca}"
        )
        with pytest.raises(TlsFailure, match=expected.replace(".", r"\.")):
            async with asyncio.timeout(TIMEOUT), client:
                pass


async def test_wrong_host_name_says_the_certificate_does_not_name_it(
    start_servers: StartServers, tmp_path: Path
) -> None:
    # Certificates for relay.example.com only: connecting to 127.0.0.1 must not verify.
    elsewhere = make_dev_certs(tmp_path / "elsewhere", hosts=["relay.example.com"], loopback=False)
    keys = elsewhere.keys
    assert keys is not None
    servers = await start_servers(**tls_overrides(keys.cert, keys.key, elsewhere.ca))
    line = one_error_line(
        await ctl(servers, tmp_path / "bob", "--tls-ca", str(elsewhere.ca), "init", "bob")
    )
    assert (
        f"the TLS certificate of key directory {servers.keys_address} does not name the "
        "host 127.0.0.1"
    ) in line
    # The name the certificate does list verifies (the CA itself is right).
    options = (("grpc.ssl_target_name_override", "relay.example.com"),)
    async with tls.secure_or_plain_channel(
        servers.keys_address, ca_file=str(elsewhere.ca), options=options
    ) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- plaintext only on loopback ------------------------------------------------------------


async def test_non_loopback_plaintext_is_refused(tmp_path: Path) -> None:
    for key in ("keyserver.listen", "node.listen", "metrics.listen"):
        cfg = config_in(tmp_path / "data", **{key: "0.0.0.0:0"})
        app: KeyserverApp | RelayApp | MetricsEndpoint = (
            KeyserverApp(cfg)
            if key.startswith("keyserver")
            else RelayApp(cfg)
            if key.startswith("node")
            else MetricsEndpoint(key, cfg.metrics.listen, CollectorRegistry(), cfg.tls)
        )
        with pytest.raises(ConfigError, match=rf"{key} '0\.0\.0\.0:0' is not a loopback"):
            async with app:
                pass


async def test_non_loopback_plaintext_with_allow_plaintext_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_in(
        tmp_path / "data", **{"keyserver.listen": "0.0.0.0:0", "tls.allow_plaintext": True}
    )
    with caplog.at_level(logging.WARNING, logger="relay.common.tls"):
        async with KeyserverApp(cfg) as keys:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{keys.port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "keyserver.listen listens on 0.0.0.0:0 WITHOUT TLS" in warning.getMessage()


# -- API keys --------------------------------------------------------------------------------


def with_api_key(config: Config, tmp_path: Path) -> Config:
    key_file = tmp_path / "billing.key"
    key_file.write_text(API_KEY + "\n")
    return dataclasses.replace(
        config, api_keys=(ApiKeyConfig("default", "billing", str(key_file)),)
    )


async def send_with_key(target: str, *, ca: Path | None = None) -> relay_pb2.SendResponse:
    channel = (
        grpc.aio.insecure_channel(target)
        if ca is None
        else tls.secure_or_plain_channel(target, ca_file=str(ca))
    )
    async with channel:
        return await relay_pb2_grpc.RelayStub(channel).Send(
            relay_pb2.SendRequest(), metadata=(("authorization", f"Bearer {API_KEY}"),)
        )


async def test_api_keys_only_over_tls_or_loopback(tmp_path: Path) -> None:
    lan = lan_address()
    if lan is None:
        pytest.skip("this machine has no non-loopback address")
    plain = {"node.listen": "0.0.0.0:0", "keyserver.listen": "0.0.0.0:0"}
    cfg = with_api_key(
        config_in(tmp_path / "data", **plain, **{"tls.allow_plaintext": True}), tmp_path
    )
    async with KeyserverApp(cfg) as keys:
        cfg = dataclasses.replace(
            cfg, keyserver=dataclasses.replace(cfg.keyserver, target=f"127.0.0.1:{keys.port}")
        )
        async with RelayApp(cfg) as relay:
            await send_with_key(f"127.0.0.1:{relay.port}")  # loopback: accepted
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await send_with_key(f"{lan}:{relay.port}")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API keys only over TLS or loopback" in (info.value.details() or "")
        for host, refused in (("127.0.0.1", False), (lan, True)):
            async with grpc.aio.insecure_channel(f"{host}:{keys.port}") as channel:
                directory = KeyDirectoryClient(channel, bearer_key=API_KEY)
                if refused:
                    with pytest.raises(Unauthenticated, match="only over TLS or loopback"):
                        await directory.list_devices("default", "nobody")
                else:
                    assert await directory.list_devices("default", "nobody") == []
    # Over TLS the same key is accepted from another host.
    certs = make_dev_certs(tmp_path / "lan-certs", hosts=[lan])
    node = certs.nodes["relay-1"]
    tls_cfg = with_api_key(
        config_in(tmp_path / "data", **plain, **tls_overrides(node.cert, node.key, certs.ca)),
        tmp_path,
    )
    async with KeyserverApp(tls_cfg) as keys:
        tls_cfg = dataclasses.replace(
            tls_cfg,
            keyserver=dataclasses.replace(tls_cfg.keyserver, target=f"{lan}:{keys.port}"),
        )
        async with RelayApp(tls_cfg) as relay:
            await send_with_key(f"{lan}:{relay.port}", ca=certs.ca)


def test_gen_api_key_makes_a_key_the_config_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys" / "billing.key"
    assert (
        relayd.main(["gen-api-key", "--tenant", "acme", "--name", "billing", "--out", str(out)])
        == 0
    )
    stanza = capsys.readouterr().out
    assert '[[api_keys]]\ntenant = "acme"\nname = "billing"\n' in stanza
    assert f'key_file = "{out}"' in stanza
    assert out.stat().st_mode & 0o777 == 0o600
    assert len(out.read_text().strip()) >= 43  # 32 random bytes, base64url
    assert len(ApiKeyConfig("acme", "billing", str(out)).key_digest()) == 32
    assert relayd.main(["gen-api-key", "--tenant", "acme", "--name", "billing"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert len(printed) >= 43 and printed != out.read_text().strip()


def test_dev_certs_command_prints_the_tls_stanza(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = tmp_path / "dev"
    argv = [
        "dev-certs",
        str(where),
        "--nodes",
        "2",
        "--host",
        "relay.internal",
        "--service",
        "redis",
    ]
    assert relayd.main(argv) == 0
    out = capsys.readouterr().out
    assert f'cert_file = "{where}/node-relay-2.pem"' in out
    assert f"relayctl --tls-ca {where}/ca.pem" in out
    names = {p.name for p in where.iterdir()}
    assert {
        "ca.pem",
        "node-relay-1.pem",
        "node-relay-2.key",
        "keys.pem",
        "service-redis.pem",
    } <= names


# -- rotation --------------------------------------------------------------------------------


@pytest.fixture
def two_cas(tmp_path: Path) -> tuple[DevCerts, DevCerts, Path]:
    """Two dev CAs and a bundle file trusting both (what clients hold during a rotation)."""
    old, new = make_dev_certs(tmp_path / "ca-old"), make_dev_certs(tmp_path / "ca-new")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(old.ca.read_text() + new.ca.read_text())
    return old, new, bundle


async def received(client: RelayClient, count: int) -> AsyncIterator[bytes]:
    messages = client.messages()
    for _ in range(count):
        async with asyncio.timeout(TIMEOUT):
            message = await anext(messages)
        yield message.content


async def test_rotation_keeps_open_streams_and_loses_no_envelope(
    start_servers: StartServers, two_cas: tuple[DevCerts, DevCerts, Path], tmp_path: Path
) -> None:
    old, new, bundle = two_cas
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "node.pem", live / "node.key"
    replace_file(old.nodes["relay-1"].cert, cert)
    replace_file(old.nodes["relay-1"].key, key)
    servers = await start_servers(**tls_overrides(cert, key, bundle))
    metrics = MetricsEndpoint(
        "metrics.listen", "127.0.0.1:0", servers.relay.metrics.registry, servers.config.tls
    )
    await metrics.__aenter__()  # the process's endpoint, as relayd serves it
    metrics_port = metrics.port
    try:
        await rotate_and_send(servers, old, new, bundle, cert, key, metrics_port, tmp_path)
    finally:
        await metrics.__aexit__(None, None, None)


async def rotate_and_send(
    servers: Servers,
    old: DevCerts,
    new: DevCerts,
    bundle: Path,
    cert: Path,
    key: Path,
    metrics_port: int,
    tmp_path: Path,
) -> None:
    relay_port = port_of(servers.relay_address)
    await register(servers.keys_address, bundle, tmp_path / "alice", "alice")
    bob = await register(servers.keys_address, bundle, tmp_path / "bob", "bob")
    n = 20
    with (
        DeviceState.open(tmp_path / "alice") as a_state,
        DeviceState.open(tmp_path / "bob") as b_state,
    ):
        async with (
            RelayClient(b_state, servers.relay_address, tls_ca=str(bundle)) as receiver,
            RelayClient(
                a_state, servers.relay_address, tls_ca=str(bundle), receive=False
            ) as sender,
        ):
            epoch = receiver.session_epoch
            for i in range(n):
                await sender.send(bob, f"before {i}".encode())
            for port in (relay_port, metrics_port):
                assert await asyncio.to_thread(served_certificate, port, bundle) == der(cert)

            replace_file(new.nodes["relay-1"].cert, cert)
            replace_file(new.nodes["relay-1"].key, key)
            tls.reload_all()

            # New connections get the new certificate, on every TLS port of the process.
            new_der = der(new.nodes["relay-1"].cert)
            for port in (relay_port, port_of(servers.keys_address), metrics_port):
                assert await asyncio.to_thread(served_certificate, port, bundle) == new_der
            # The stream opened before the rotation keeps its session and sends on.
            for i in range(n):
                await sender.send(bob, f"after {i}".encode())
            # A client that trusts only the old CA cannot connect any more.
            async with open_channel(servers.keys_address, tls_ca=str(old.ca)) as channel:
                directory = KeyDirectoryClient(
                    channel,
                    target=endpoint("key directory", servers.keys_address, tls_ca=str(old.ca)),
                )
                with pytest.raises(TlsFailure, match="did not verify"):
                    await directory.list_devices("default", "bob")
            # A new session (new connection, new certificate) sends too.
            async with RelayClient(
                a_state, servers.relay_address, tls_ca=str(bundle), receive=False
            ) as fresh:
                for i in range(n):
                    await fresh.send(bob, f"fresh {i}".encode())
            got = [c async for c in received(receiver, 3 * n)]
            assert receiver.session_epoch == epoch and receiver.error is None
    expected = [f"{kind} {i}".encode() for kind in ("before", "after", "fresh") for i in range(n)]
    assert got == expected


async def test_changed_files_are_noticed_without_a_signal(
    tls_servers: Servers, certs: DevCerts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "RECHECK_SECONDS", 0.0)  # look at the files at every handshake
    other = make_dev_certs(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(certs.ca.read_text() + other.ca.read_text())
    port = port_of(tls_servers.relay_address)
    node, rotated = certs.nodes["relay-1"], other.nodes["relay-1"]
    assert await asyncio.to_thread(served_certificate, port, bundle) == der(node.cert)
    # The files the servers were started with, overwritten: no reload_all, no SIGHUP.
    replace_file(rotated.cert, node.cert)
    replace_file(rotated.key, node.key)
    assert await asyncio.to_thread(served_certificate, port, bundle) == der(rotated.cert)


def test_metrics_endpoint_serves_https_only(tmp_path: Path, certs: DevCerts) -> None:
    registry = CollectorRegistry()
    Counter("tls_test_total", "a counter", registry=registry).inc()
    node = certs.nodes["relay-1"]
    port = free_port()
    cfg = config_in(tmp_path / "data", **tls_overrides(node.cert, node.key, certs.ca))
    server = start_metrics_server(f"127.0.0.1:{port}", registry, cfg.tls)
    try:
        context = ssl.create_default_context(cafile=str(certs.ca))
        with urllib.request.urlopen(f"https://localhost:{port}/metrics", context=context) as r:
            assert b"tls_test_total 1.0" in r.read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        server.shutdown()
        server.server_close()


async def test_sighup_makes_relayd_read_its_certificate_again(
    two_cas: tuple[DevCerts, DevCerts, Path], tmp_path: Path
) -> None:
    old, new, bundle = two_cas
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "node.pem", live / "node.key"
    replace_file(old.nodes["relay-1"].cert, cert)
    replace_file(old.nodes["relay-1"].key, key)
    config = tmp_path / "relayd.toml"
    config.write_text(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nca_file = "{bundle}"\n')
    relayd_argv = Relayd(tmp_path / "data", config=config)
    proc = await asyncio.create_subprocess_exec(
        *relayd_argv.argv(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []

    async def read_until(text: str) -> None:
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while text not in (lines or [""])[-1]:
                line = await proc.stdout.readline()
                assert line, "relayd exited:\n" + "".join(lines)
                lines.append(line.decode())

    try:
        await read_until(" ready (storage:")
        port = relayd_argv.relay_port
        assert await asyncio.to_thread(served_certificate, port, bundle) == der(cert)
        replace_file(new.nodes["relay-1"].cert, cert)
        replace_file(new.nodes["relay-1"].key, key)
        proc.send_signal(signal.SIGHUP)
        await read_until("SIGHUP: TLS certificates")
        served = await asyncio.to_thread(served_certificate, port, bundle)
        assert served == der(new.nodes["relay-1"].cert), "".join(lines)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            rest, _ = await proc.communicate()
    assert proc.returncode == 0, "".join(lines) + rest.decode()


# -- the load generator and the loopback rules -----------------------------------------------


async def test_load_generator_over_tls(
    tls_servers: Servers, certs: DevCerts, tmp_path: Path
) -> None:
    from loadtest.cli import main

    argv = [
        "run", "--target", tls_servers.relay_address, "--keys", tls_servers.keys_address,
        "--tls-ca", str(certs.ca), "--json", str(tmp_path / "report.json"),
        "--plot", str(tmp_path / "report.png"), "--interval", "0.5", "--drain-timeout", "30",
        "--setup-timeout", "60", "--quiet", "--devices", "10", "--rate", "100",
        "--duration", "1", "--batch", "5",
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reconciliation"]["delivered_once"] == 100, report["verdict"]


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5", True),
        ("ipv4:127.8.0.1:5", True),
        ("ipv6:%5B::1%5D:5", True),
        ("ipv6:%5B::ffff:127.0.0.1%5D:5", True),
        ("unix:/run/relay.sock", True),
        ("ipv4:10.0.0.7:5", False),
        ("ipv6:%5B::ffff:10.0.0.7%5D:5", False),
        ("ipv6:%5B2001:db8::1%5D:5", False),
        ("", False),
    ],
)
def test_which_peers_are_local(peer: str, local: bool) -> None:
    assert tls.peer_is_local(peer) is local
