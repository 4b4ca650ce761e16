"""Development certificates: a local CA and certificates for every hop (``relayd dev-certs``).

For tests, the TLS quick start (``make run-tls``) and the helm chart's self-signed mode;
never for production keys. ``make_dev_certs(DIR, node_ids=[...])`` writes, all PEM:

- ``ca.pem`` (and ``ca.key``): the CA every other certificate is signed by;
- ``node-<id>.pem`` / ``.key`` for each relay node: server and client use (node links
  are mutual TLS), SAN DNS ``localhost`` and the ``hosts`` given, IP ``127.0.0.1`` and
  ``::1`` (``loopback=False``: the ``hosts`` only), and the URI
  ``urn:e2ee-relay:node:<id>`` naming the node id;
- ``keys.pem`` / ``.key``: the key directory (server);
- ``client.pem`` / ``.key``: a client certificate (e.g. for Cassandra and Redis);
- ``service-<name>.pem`` / ``.key`` for each of ``services`` (e.g. ``redis``, ``cassandra``).

Keys are ECDSA P-256, written 0600; certificates last ``days`` (default 30).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.common.tls import NODE_URI_PREFIX

DEFAULT_DAYS = 30


@dataclass(frozen=True, slots=True)
class CertFiles:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DevCerts:
    """What :func:`make_dev_certs` wrote."""

    directory: Path
    ca: Path
    ca_key: Path
    nodes: dict[str, CertFiles] = field(default_factory=dict)
    keys: CertFiles | None = None
    client: CertFiles | None = None
    services: dict[str, CertFiles] = field(default_factory=dict)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "e2ee-relay dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(
    hosts: Sequence[str], uris: Sequence[str] = (), *, loopback: bool = True
) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in ("localhost", *hosts, "127.0.0.1", "::1") if loopback else hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    return x509.SubjectAlternativeName(list(dict.fromkeys(names)))


class _Ca:
    def __init__(self, days: int) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.days = days
        now = dt.datetime.now(dt.UTC)
        # A name of its own per CA (and key identifiers below): a client trusting the old
        # and the new CA during a rotation must tell them apart.
        self.name = _name(f"e2ee-relay dev CA {secrets.token_hex(4)}")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        directory: Path,
        stem: str,
        common_name: str,
        san: x509.SubjectAlternativeName,
        usages: Sequence[x509.ObjectIdentifier],
    ) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        files = CertFiles(directory / f"{stem}.pem", directory / f"{stem}.key")
        _write_key(files.key, key)
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return files


def make_dev_certs(
    directory: Path,
    *,
    node_ids: Sequence[str] = ("relay-1",),
    hosts: Sequence[str] = (),
    services: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    loopback: bool = True,
) -> DevCerts:
    """Write a CA and certificates for the nodes, key directory, a client and services.

    ``loopback=False`` leaves ``localhost``, ``127.0.0.1`` and ``::1`` out of the server
    certificates (then they name ``hosts`` only; tests of a host name that does not match).
    """
    if not loopback and not hosts:
        raise ValueError("loopback=False needs at least one of hosts")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Ca(days)
    ca_path, ca_key = directory / "ca.pem", directory / "ca.key"
    _write_key(ca_key, ca.key)
    ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    nodes = {
        node: ca.issue(
            directory,
            f"node-{node}",
            node,
            _san(hosts, [NODE_URI_PREFIX + node], loopback=loopback),
            both,
        )
        for node in node_ids
    }
    san = _san(hosts, loopback=loopback)
    keys = ca.issue(directory, "keys", "key directory", san, both)
    client = ca.issue(directory, "client", "client", _san(()), (ExtendedKeyUsageOID.CLIENT_AUTH,))
    issued = {name: ca.issue(directory, f"service-{name}", name, san, both) for name in services}
    return DevCerts(directory, ca_path, ca_key, nodes, keys, client, issued)
