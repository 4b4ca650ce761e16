#!/usr/bin/env python3
"""Wait until a Cassandra node answers CQL; used by scripts/services/services.sh.

Ready means ``SELECT release_version FROM system.local`` returns a row. The query
goes through cassandra-driver when it is importable; otherwise a minimal native
protocol v4 client (STARTUP + QUERY over a plain socket) is used, so a bare
``python3`` also works.

Exit codes: 0 ready (prints the release version), 1 timeout,
2 the process given with --pid exited before the node was ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import time

QUERY = "SELECT release_version FROM system.local"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def query_with_driver(host: str, port: int, timeout: float) -> str:
    from cassandra.cluster import (  # type: ignore[import-not-found]
        EXEC_PROFILE_DEFAULT,
        Cluster,
        ExecutionProfile,
    )
    from cassandra.policies import RoundRobinPolicy  # type: ignore[import-not-found]

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=timeout)
    cluster = Cluster(
        contact_points=[host],
        port=port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=timeout,
        control_connection_timeout=timeout,
    )
    try:
        session = cluster.connect()
        row = session.execute(QUERY).one()
        return str(row[0])
    finally:
        cluster.shutdown()


# --- minimal CQL native protocol v4 fallback -------------------------------


def _frame(stream: int, opcode: int, body: bytes) -> bytes:
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    _ver, _flags, _stream, opcode, length = struct.unpack(">BBhBi", _recv_exact(sock, 9))
    return opcode, _recv_exact(sock, length)


def _string(body: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">H", body, pos)
    pos += 2
    return body[pos : pos + n].decode("utf-8"), pos + n


def query_raw(host: str, port: int, timeout: float) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        startup = struct.pack(">H", 1)
        for s in ("CQL_VERSION", "3.0.0"):
            startup += struct.pack(">H", len(s)) + s.encode()
        sock.sendall(_frame(1, 0x01, startup))  # STARTUP
        opcode, body = _read_frame(sock)
        if opcode != 0x02:  # READY
            raise RuntimeError(f"STARTUP answered with opcode {opcode:#x}")
        q = QUERY.encode()
        sock.sendall(_frame(2, 0x07, struct.pack(">i", len(q)) + q + struct.pack(">HB", 0x0001, 0)))
        opcode, body = _read_frame(sock)
        if opcode == 0x00:  # ERROR
            msg, _ = _string(body, 4)
            raise RuntimeError(f"query failed: {msg}")
        if opcode != 0x08:  # RESULT
            raise RuntimeError(f"QUERY answered with opcode {opcode:#x}")
        kind, flags, ncols = struct.unpack_from(">iii", body, 0)
        if kind != 2:
            raise RuntimeError(f"unexpected result kind {kind}")
        pos = 12
        if flags & 0x0002:  # has_more_pages: paging state
            (n,) = struct.unpack_from(">i", body, pos)
            pos += 4 + max(n, 0)
        if flags & 0x0004:  # no_metadata
            raise RuntimeError("result without metadata")
        global_spec = bool(flags & 0x0001)
        if global_spec:
            _, pos = _string(body, pos)
            _, pos = _string(body, pos)
        for _ in range(ncols):
            if not global_spec:
                _, pos = _string(body, pos)
                _, pos = _string(body, pos)
            _, pos = _string(body, pos)  # column name
            (type_id,) = struct.unpack_from(">H", body, pos)
            pos += 2
            if type_id == 0x0000:  # custom type carries a class name
                _, pos = _string(body, pos)
        (nrows,) = struct.unpack_from(">i", body, pos)
        pos += 4
        if nrows < 1:
            raise RuntimeError("system.local returned no row")
        (n,) = struct.unpack_from(">i", body, pos)
        pos += 4
        return body[pos : pos + n].decode("utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9042)
    ap.add_argument("--timeout", type=float, default=180.0, help="overall seconds to wait")
    ap.add_argument("--pid", type=int, default=0, help="give up early if this process exits")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--no-driver", action="store_true", help="use the built-in protocol client")
    args = ap.parse_args()

    logging.basicConfig(level=logging.CRITICAL)  # silence the driver's retry noise
    use_driver = not args.no_driver
    if use_driver:
        try:
            import cassandra.cluster  # noqa: F401  # type: ignore[import-not-found]
        except ImportError:
            use_driver = False
    query = query_with_driver if use_driver else query_raw

    deadline = time.monotonic() + args.timeout
    last_error = "port closed"
    while True:
        if args.pid and not pid_alive(args.pid):
            print(f"process {args.pid} exited ({last_error})", file=sys.stderr)
            return 2
        if port_open(args.host, args.port):
            try:
                left = max(1.0, min(10.0, deadline - time.monotonic()))
                print(query(args.host, args.port, left))
                return 0
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            print(f"timed out after {args.timeout:.0f} s ({last_error})", file=sys.stderr)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
