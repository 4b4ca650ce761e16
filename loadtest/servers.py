"""Servers under test as subprocesses: ``relayd run`` and the forwarder, optionally pinned.

Each is started on free loopback ports and is ready once the gRPC health check says
SERVING for its services. Resident memory and CPU time are read from ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.forwarder import KEYS_SERVICE, RELAY_SERVICE

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    return _proc_status(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pids_running(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (e.g. ``CassandraDaemon``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy (not idle or waiting on I/O) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_share: float, timeout: float, window: float = 1.0) -> bool:
    """Wait until the whole machine used at most ``max_share`` of a core over ``window``
    seconds (our idle servers included); False if that did not happen within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        before, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(window)  # a measurement window, not synchronisation
        share = (machine_busy_seconds() - before) / (time.monotonic() - t0)
        if share <= max_share:
            return True
        if time.monotonic() >= deadline:
            return False


def wait_serving(target: str, services: list[str], timeout: float = START_TIMEOUT_S) -> None:
    """Block until ``target`` reports SERVING for every one of ``services``."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                wait_for_ready=True,
                timeout=timeout,
            )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"{target} {service}: {reply.status}")


@dataclass
class ServerProcess:
    """One server subprocess; a context manager that starts it and stops it."""

    name: str
    argv: list[str]
    #: (address, services) pairs that must be SERVING before it counts as started.
    health: list[tuple[str, list[str]]]
    log_path: Path
    cpus: tuple[int, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> ServerProcess:
        """Spawn (pinned with taskset when ``cpus``) and wait until healthy."""
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        """Start the process (pinned with taskset when ``cpus``) without waiting."""
        argv = list(self.argv)
        if self.cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", ",".join(map(str, self.cpus)), *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self) -> ServerProcess:
        """Block until every health check says SERVING (stop it and raise if not)."""
        try:
            for target, services in self.health:
                wait_serving(target, services)
        except BaseException:
            self.stop()
            raise RuntimeError(f"{self.name} did not start; log:\n{self.log_tail()}") from None
        return self

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a grace period; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash: no drain, nothing flushed) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the generator finds a server: relay target and key directory."""

    target: str
    keys: str
    #: Every relay node of a cluster (``target`` is the first); empty: ``target`` only.
    targets: tuple[str, ...] = ()

    @property
    def all_targets(self) -> tuple[str, ...]:
        """The relay nodes the generator spreads its devices over."""
        return self.targets or (self.target,)


def python_module(module: str) -> list[str]:
    """The command line that runs ``module`` with this interpreter."""
    return [sys.executable, "-m", module]


def _python(module: str, gc_probe: Path | None) -> list[str]:
    if gc_probe is None:
        return python_module(module)
    return [sys.executable, "-m", "loadtest.gcprobe", str(gc_probe), module]


def relayd(
    data_dir: Path,
    cpus: tuple[int, ...] = (),
    gc_probe: Path | None = None,
    config: Path | None = None,
) -> tuple[ServerProcess, Endpoints]:
    """``relayd run`` on free ports with its data in ``data_dir``.

    With ``gc_probe``, it runs under ``loadtest.gcprobe``, which writes its garbage
    collection pauses there; with ``config``, it reads that TOML file (e.g. the Cassandra
    backend of the store bench).
    """
    relay, keys = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = [
        *_python("relay.cli.relayd", gc_probe), "run", "--data-dir", str(data_dir),
        "--listen", relay, "--keys-listen", keys, "--log-level", "WARNING",
        # Metrics on as in production, on a port of its own (never the shared default).
        "--metrics-listen", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    if config is not None:
        argv += ["--config", str(config)]
    server = ServerProcess(
        "relayd",
        argv,
        [(keys, [KEYS_SERVICE]), (relay, [RELAY_SERVICE])],
        data_dir.parent / f"relayd-{relay.rsplit(':', 1)[1]}.log",
        cpus,
    )
    return server, Endpoints(relay, keys)


def forwarder(
    log_dir: Path, cpus: tuple[int, ...] = (), gc_probe: Path | None = None
) -> tuple[ServerProcess, Endpoints]:
    """The bare forwarder on a free port (it serves its trivial key directory there too)."""
    listen = f"127.0.0.1:{free_port()}"
    argv = [*_python("loadtest.cli", gc_probe), "forwarder", "--listen", listen]
    server = ServerProcess(
        "forwarder",
        argv,
        [(listen, [RELAY_SERVICE, KEYS_SERVICE])],
        log_dir / f"forwarder-{listen.rsplit(':', 1)[1]}.log",
        cpus,
    )
    return server, Endpoints(listen, listen)
