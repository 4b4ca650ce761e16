#!/usr/bin/env python3
"""Whether a TLS service of scripts/services/services.sh answers; standard library only.

``--protocol redis`` sends ``PING`` and expects ``+PONG``; ``--protocol cql`` sends a
native-protocol v4 ``OPTIONS`` frame and expects ``SUPPORTED``. The server certificate
is verified against ``--ca`` (host name included); ``--cert``/``--key`` present a
client certificate. Exit 0 when it answers, 1 otherwise (the reason on stderr).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import struct
import sys


def probe(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key or None)
    with (
        socket.create_connection((args.host, args.port), timeout=args.timeout) as raw,
        context.wrap_socket(raw, server_hostname=args.host) as sock,
    ):
        if args.protocol == "redis":
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
            if not answer.startswith(b"+PONG"):
                raise RuntimeError(f"PING answered {answer!r}")
        else:
            sock.sendall(struct.pack(">BBhBi", 0x04, 0, 1, 0x05, 0))  # OPTIONS
            header = sock.recv(9)
            if len(header) < 9 or header[4] != 0x06:  # SUPPORTED
                raise RuntimeError(f"OPTIONS answered {header!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=("redis", "cql"), required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    try:
        probe(args)
    except (OSError, RuntimeError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
