#!/usr/bin/env python3
"""Development certificates for the TLS Redis and Cassandra of scripts/services/services.sh.

Writes, with ``relay.common.devcerts.make_dev_certs``, into ``--dir``: ``ca.pem``,
``service-redis.pem``/``.key``, ``service-cassandra.pem``/``.key``,
``client.pem``/``.key``, and ``cassandra-keystore.pem`` (the Cassandra key and
certificate in one file, as Cassandra's PEMBasedSslContextFactory reads a keystore).

The set is made again when a file is missing or a certificate expires within
``--min-days``. Prints ``unchanged`` or ``regenerated``; exit 0, or 1 on failure
(e.g. the relay package is not importable: run ``make install``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

CERTS = ("ca.pem", "service-redis.pem", "service-cassandra.pem", "client.pem")
KEYS = ("service-redis.key", "service-cassandra.key", "client.key")
KEYSTORE = "cassandra-keystore.pem"


def fresh(directory: Path, min_days: int) -> bool:
    """Whether every file is there and no certificate expires within ``min_days``."""
    from cryptography import x509  # noqa: PLC0415

    if not all((directory / name).is_file() for name in (*CERTS, *KEYS, KEYSTORE)):
        return False
    limit = dt.datetime.now(dt.UTC) + dt.timedelta(days=min_days)
    for name in CERTS:
        try:
            cert = x509.load_pem_x509_certificate((directory / name).read_bytes())
        except ValueError:
            return False
        if cert.not_valid_after_utc < limit:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--days", type=int, default=365, help="lifetime of new certificates")
    ap.add_argument("--min-days", type=int, default=30, help="renew when fewer days are left")
    args = ap.parse_args()
    directory: Path = args.dir
    try:
        if fresh(directory, args.min_days):  # cheap: no import of the relay package
            print("unchanged")
            return 0
        # The repo's own package, also when run by a python3 outside the venv.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from relay.common.devcerts import make_dev_certs  # noqa: PLC0415
    except ImportError as exc:
        print(f"cannot import relay.common.devcerts ({exc}): run `make install`", file=sys.stderr)
        return 1
    # A new set in a temporary directory, then moved in file by file: a reader never
    # sees a CA that does not match the certificates next to it for long.
    tmp = directory.with_name(directory.name + ".new")
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.iterdir():
        old.unlink()
    made = make_dev_certs(tmp, node_ids=(), services=("redis", "cassandra"), days=args.days)
    cassandra = made.services["cassandra"]
    keystore = tmp / KEYSTORE
    keystore.touch(mode=0o600)
    keystore.write_bytes(cassandra.key.read_bytes() + cassandra.cert.read_bytes())
    directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(tmp.iterdir()):
        path.replace(directory / path.name)
    tmp.rmdir()
    print("regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
