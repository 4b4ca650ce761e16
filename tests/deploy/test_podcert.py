"""The pods' certificates: issued from the CA helm makes, accepted by real gRPC mutual TLS."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from relay.cli import podcert
from relay.common.tls import node_id_from_auth_context
from tests.deploy.test_chart import find, render


def helm_ca(tmp_path: Path) -> tuple[Path, Path]:
    """The self-signed CA (helm's genCA, RSA) of a rendered release, as files."""
    secret = find(render(""), "Secret", "rel-e2ee-relay-ca")
    cert, key = tmp_path / "ca-tls.crt", tmp_path / "ca-tls.key"
    cert.write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
    key.write_bytes(base64.b64decode(secret["data"]["tls.key"]))
    return cert, key


def issue(tmp_path: Path, name: str, ca: tuple[Path, Path], *args: str) -> Path:
    out = tmp_path / name
    code = podcert.main(["--ca-cert", str(ca[0]), "--ca-key", str(ca[1]), "--out", str(out), *args])
    assert code == 0
    return out


def test_certificate_names_the_node_id_and_the_pod_address(tmp_path: Path) -> None:
    ca = helm_ca(tmp_path)
    out = issue(
        tmp_path,
        "pod",
        ca,
        "--node-id",
        "rel-relay-7f9c",
        "--host",
        "10.1.2.3",
        "--host",
        "rel-e2ee-relay-relay.ns.svc",
        "--days",
        "30",
    )
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["rel-e2ee-relay-relay.ns.svc"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:e2ee-relay:node:rel-relay-7f9c"
    ]
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert (out / "ca.crt").read_bytes() == ca[0].read_bytes()
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 30


def test_a_key_that_is_not_the_cas_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_cert, _ = helm_ca(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = helm_ca(other)  # another render: another CA
    code = podcert.main(
        [
            "--ca-cert",
            str(ca_cert),
            "--ca-key",
            str(other_key),
            "--out",
            str(tmp_path / "x"),
            "--host",
            "h",
        ]
    )
    assert code == 1
    assert "is not the key of the CA certificate" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    auth = {k: list(v) for k, v in context.auth_context().items()}
    return (node_id_from_auth_context(auth) or "-").encode()


async def test_two_pods_certificates_make_a_mutual_tls_link(tmp_path: Path) -> None:
    """As node links do: the server requires a client certificate, the client dials an IP."""
    ca = helm_ca(tmp_path)
    server_dir = issue(tmp_path, "a", ca, "--node-id", "pod-a", "--host", "127.0.0.1")
    client_dir = issue(tmp_path, "b", ca, "--node-id", "pod-b", "--host", "127.0.0.2")
    creds = grpc.ssl_server_credentials(
        [((server_dir / "tls.key").read_bytes(), (server_dir / "tls.crt").read_bytes())],
        root_certificates=(server_dir / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_who)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"Who": handler})])
    bound = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        client_creds = grpc.ssl_channel_credentials(
            (client_dir / "ca.crt").read_bytes(),
            (client_dir / "tls.key").read_bytes(),
            (client_dir / "tls.crt").read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{bound}", client_creds) as channel:
            who = await channel.unary_unary("/t.T/Who")(b"", timeout=10)
        assert who == b"pod-b"
        # Without a client certificate the link listener refuses the handshake.
        no_cert = grpc.ssl_channel_credentials((client_dir / "ca.crt").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{bound}", no_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/t.T/Who")(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_issued_key_is_p256() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert, key = podcert.issue(ca_cert, ca_key, hosts=["h"], days=365)
    assert isinstance(key.curve, ec.SECP256R1)
    # Never valid past the CA that signed it.
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    with pytest.raises(ValueError, match="at least one"):
        podcert.issue(ca_cert, ca_key, hosts=[])
