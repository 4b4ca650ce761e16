"""Run ``relayd`` as a real subprocess on free loopback ports (integration tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Relayd:
    """A ``relayd run`` (or ``relayd relay``) process; ``start()`` returns once SERVING.

    ``command="relay"`` runs a relay node only, configured by ``config`` (a TOML file)
    and ``node_id``; ``command="run"`` runs relay node and key directory on ``data_dir``.
    """

    data_dir: Path
    relay_port: int = field(default_factory=free_port)
    keys_port: int = field(default_factory=free_port)
    #: Its Prometheus endpoint (a free port, so parallel relayds never share 9464).
    metrics_port: int = field(default_factory=free_port)
    command: str = "run"
    config: Path | None = None
    node_id: str = "relay-1"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: More arguments for relayd, e.g. ["--log-level", "DEBUG"].
    extra_args: list[str] = field(default_factory=list)
    #: ``--drain-delay``: seconds of NOT_SERVING after SIGTERM (0: stop() is quick).
    drain_delay: float = 0.0

    @property
    def relay_address(self) -> str:
        return f"127.0.0.1:{self.relay_port}"

    @property
    def keys_address(self) -> str:
        return f"127.0.0.1:{self.keys_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "relay.cli.relayd",
            self.command,
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.relay_address,
            "--node-id",
            self.node_id,
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
        ]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        if self.command == "run":
            argv += ["--keys-listen", self.keys_address]
        argv += ["--drain-delay", str(self.drain_delay)]
        return argv + self.extra_args

    def spawn(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"relayd-{self.relay_port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    async def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        checks = [(self.relay_address, "relaypb.relay.v1.Relay")]
        if self.command == "run":
            checks.insert(0, (self.keys_address, "relaypb.keys.v1.KeyDirectory"))
        for target, service in checks:
            async with grpc.aio.insecure_channel(target) as channel:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service),
                        wait_for_ready=True,
                        timeout=timeout,
                    )
                except grpc.aio.AioRpcError as exc:
                    raise AssertionError(f"relayd did not start: {self.log()}") from exc
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)
