"""Issue one process's TLS certificate from a CA: the helm chart's init container.

    python -m relay.cli.podcert --ca-cert CA.crt --ca-key CA.key --out DIR
        [--node-id ID] [--host H ...] [--days D]

A relay node's certificate must name its node id (URI SAN ``urn:e2ee-relay:node:<id>``,
checked by node links) and the address peers dial (its pod IP, ``node.link_advertise``);
in a Deployment both are known only once the pod exists, so each pod issues its own
certificate when it starts, from a CA kept in a Secret (the chart's ``tls.mode``
``selfSigned`` or ``existingCA``). It writes to DIR, all PEM: ``tls.crt`` (the
certificate, server and client use), ``tls.key`` (0600) and ``ca.crt`` (the CA
certificate, which verifies peers, the key directory and the device port). The CA key is
read, never written or printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.common.tls import NODE_URI_PREFIX

#: CA keys this signs with: EC (e.g. cert-manager's default) or RSA (helm's genCA).
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
#: Validity of an issued certificate; a pod that lives longer needs a restart to renew.
DEFAULT_DAYS = 365


def subject_alternative_name(
    hosts: Sequence[str], node_id: str = ""
) -> x509.SubjectAlternativeName:
    """SANs naming each of ``hosts`` (IP address or DNS name) and, if given, ``node_id``."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if node_id:
        names.append(x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id))
    return x509.SubjectAlternativeName(list(dict.fromkeys(names)))


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The CA's own key identifier, which verifiers match against.

    CAs compute it differently: helm's genCA (Go) does not use the SHA-1 that
    cryptography's ``from_issuer_public_key`` would, and the chain would not verify.
    """
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def issue(
    ca_cert: x509.Certificate,
    ca_key: CaKey,
    *,
    hosts: Sequence[str],
    node_id: str = "",
    days: int = DEFAULT_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new ECDSA P-256 key and a certificate for it signed by the CA (server and client)."""
    if not hosts and not node_id:
        raise ValueError("a certificate needs at least one --host or a --node-id")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    common_name = node_id or hosts[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(subject_alternative_name(hosts, node_id), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write(
    directory: Path,
    ca_cert: x509.Certificate,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Write ``tls.crt``, ``tls.key`` (0600) and ``ca.crt`` to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "tls.key"
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, CaKey]:
    ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{key_path}: not an EC or RSA private key")
    if ca_key.public_key() != ca_cert.public_key():
        raise ValueError(f"{key_path} is not the key of the CA certificate {cert_path}")
    return ca_cert, ca_key


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: issue the certificate and write it to ``--out``."""
    parser = argparse.ArgumentParser(
        prog="python -m relay.cli.podcert",
        description="Issue this process's TLS certificate from a CA (Kubernetes init container).",
    )
    parser.add_argument("--ca-cert", type=Path, required=True, help="PEM CA certificate")
    parser.add_argument("--ca-key", type=Path, required=True, help="PEM CA private key")
    parser.add_argument("--out", type=Path, required=True, help="directory to write to")
    parser.add_argument("--node-id", default="", help="relay node id to name (URI SAN)")
    parser.add_argument(
        "--host", action="append", default=[], help="DNS name or IP address to name; repeat"
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity (365)")
    args = parser.parse_args(argv)
    try:
        ca_cert, ca_key = _load_ca(args.ca_cert, args.ca_key)
        cert, key = issue(ca_cert, ca_key, hosts=args.host, node_id=args.node_id, days=args.days)
        write(args.out, ca_cert, cert, key)
    except (OSError, ValueError) as exc:
        print(f"podcert: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(args.host + ([NODE_URI_PREFIX + args.node_id] if args.node_id else []))
    print(
        f"podcert: wrote {args.out}/tls.crt for {names}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
