"""``relayd relay --processes N``: N relay nodes of one host on one port, supervised.

Python runs one event loop per process, so one relay node uses about one core. With
``--processes N`` the ``relayd`` process serves nothing itself: it starts N children,
each a complete relay node (``relayd relay`` with the same arguments plus
``--process-index I``), and keeps them running.

- **One device port.** Every child binds ``node.listen`` with ``SO_REUSEPORT``
  (``grpc.so_reuseport``; grpcio turns it on by default, the children ask for it
  explicitly) and the kernel spreads new connections over the children. A child that
  dies closes only its own socket: its siblings keep the port open, and its devices'
  SDKs reconnect to one of them.
- **A node each.** Child I is node ``<node.id>-<I>``, with a link listener and a
  metrics endpoint of its own (:func:`node_config`); the children find each other in
  Redis presence and route over node links like nodes on different hosts.
- **Shared state only.** Queues must be in Cassandra and presence in Redis
  (:func:`check_shareable`): the embedded SQLite queue has one writer, its process,
  which numbers queue rows in memory, and local presence is one process's.
- **Supervised.** A child that exits is started again after a backoff
  (``RESTART_DELAYS``), with a log line naming its exit code. SIGTERM or SIGINT to the
  parent is passed on to every child (each drains as a lone ``relayd relay`` would);
  the parent waits for them, then kills what is left after ``stop_timeout``. SIGHUP is
  passed on too. On Linux a child also gets SIGTERM if the parent dies.

The parent runs no gRPC and opens no store; each child is a fresh interpreter (exec'd,
never a bare fork: forking a process that has started grpc is not safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.config import Config, ConfigError

log = logging.getLogger("relayd.processes")

#: Hidden ``relayd relay`` flags the supervisor gives its children.
PROCESS_INDEX_FLAG = "--process-index"
SUPERVISOR_PID_FLAG = "--supervisor-pid"
#: Seconds before a crashed child is started again: the n-th restart in a row waits the
#: n-th delay (the last one from then on).
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A child that ran this long counts as healthy: its next exit restarts it after the
#: first delay again.
HEALTHY_SECONDS = 60.0
#: Seconds the parent waits beyond a child's own bound on stopping before killing it.
STOP_MARGIN_SECONDS = 5.0
MAX_PORT = 65535
_PR_SET_PDEATHSIG = 1


def node_id(base: str, index: int) -> str:
    """The node id of child ``index`` of a relayd whose ``node.id`` is ``base``."""
    return f"{base}-{index}"


def _shift(key: str, address: str, offset: int) -> str:
    """``address`` (``host:port``) with its port moved up by ``offset``; port 0 stays 0."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{key}: {address!r} is not host:port")
    number = int(port)
    if number == 0:
        return address
    if number + offset > MAX_PORT:
        raise ConfigError(
            f"{key}: port {number} + process index {offset} is past {MAX_PORT}: "
            "child I of --processes listens on the port plus I; pick a lower port"
        )
    return f"{host}:{number + offset}"


def node_config(config: Config, index: int) -> Config:
    """The configuration of child ``index`` (0-based) of ``relayd relay --processes N``.

    Its node id is ``<node.id>-<index>``; ``node.link_listen``, ``node.link_advertise``
    and ``metrics.listen`` move up by ``index`` (a port 0, a free port per process,
    stays 0: the link address bound is what presence advertises). ``node.listen`` is
    the same for all: they share it.
    """
    node = config.node
    shifted_node = dataclasses.replace(
        node,
        id=node_id(node.id, index),
        link_listen=_shift("node.link_listen", node.link_listen, index),
        link_advertise=(
            _shift("node.link_advertise", node.link_advertise, index) if node.link_advertise else ""
        ),
    )
    metrics = config.metrics
    if metrics.endpoint("relay") is not None:
        metrics = dataclasses.replace(
            metrics, listen=_shift("metrics.listen", metrics.listen, index)
        )
    return dataclasses.replace(config, node=shifted_node, metrics=metrics)


def check_shareable(config: Config, count: int) -> None:
    """Refuse (ConfigError naming the key) a configuration N processes cannot share."""
    flag = f"--processes {count}"
    if config.storage.backend != "cassandra":
        raise ConfigError(
            f"storage.backend: {config.storage.backend!r} cannot be shared by {flag}: the "
            "embedded SQLite queue has a single writer, its own process, which numbers "
            "queue rows in memory, so several processes would hand out the same ids. "
            'Set storage.backend = "cassandra" (see docs/operations.md, Running a cluster), '
            "or run one process"
        )
    if config.presence.backend != "redis":
        raise ConfigError(
            f"presence.backend: {config.presence.backend!r} is one process's: the nodes of "
            f'{flag} find each other\'s devices only in Redis. Set presence.backend = "redis"'
        )
    if config.tls.enabled:
        raise ConfigError(
            f"tls.cert_file: node links are mutual TLS when [tls] is set, and a node "
            f"certificate names one node id, but {flag} runs nodes "
            f"{node_id(config.node.id, 0)} .. {node_id(config.node.id, count - 1)}. "
            "Run one relayd relay per node id with its own certificate instead"
        )
    _, _, port = config.node.listen.rpartition(":")
    if port == "0":
        raise ConfigError(
            f"node.listen: port 0 picks a free port per process, but the processes of "
            f"{flag} share one port: name it (e.g. 0.0.0.0:50051)"
        )
    _, _, link_port = config.node.link_listen.rpartition(":")
    if config.node.link_advertise and link_port == "0":
        raise ConfigError(
            f"node.link_advertise: {config.node.link_advertise!r} names one address, but "
            f"with node.link_listen on port 0 each process of {flag} gets a free port of "
            "its own: give node.link_listen a port (child I listens on it plus I and "
            "advertises node.link_advertise's port plus I), or leave link_advertise empty"
        )
    node_config(config, count - 1)  # every child's ports fit


def die_with_parent(parent_pid: int) -> None:
    """Make this child get SIGTERM when its supervisor ``parent_pid`` dies (Linux).

    Without it, a supervisor killed by SIGKILL would leave its children serving,
    unsupervised. If the supervisor is already gone, exit now.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit("relayd: the supervising relayd is gone; not starting")


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``exit code -9 (killed by SIGKILL)``, for log lines."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
    return f"exit code {code}"


@dataclass
class Child:
    """One supervised child: its index, node id, and the process running it now."""

    index: int
    node_id: str
    proc: asyncio.subprocess.Process | None = None
    #: Every pid it ran as, oldest first.
    pids: list[int] = field(default_factory=list)
    #: Exit codes of its processes so far, oldest first.
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Keep one child per node id running ``argv`` + ``--process-index I`` until stopped.

    ``argv`` is the full command (interpreter first). ``stop_timeout`` is how long
    :meth:`stop` waits for children before killing them. ``changed`` is set whenever a
    child starts or exits (tests wait on it).
    """

    def __init__(
        self,
        argv: Sequence[str],
        node_ids: Sequence[str],
        *,
        stop_timeout: float,
        restart_delays: Sequence[float] = RESTART_DELAYS,
        healthy_seconds: float = HEALTHY_SECONDS,
    ) -> None:
        self._argv = list(argv)
        self.children = [Child(i, n) for i, n in enumerate(node_ids)]
        self._stop_timeout = stop_timeout
        self._delays = tuple(restart_delays)
        self._healthy = healthy_seconds
        self._stopping = asyncio.Event()
        self._signal = signal.SIGTERM
        self.changed = asyncio.Event()

    def _argv_of(self, child: Child) -> list[str]:
        return [
            *self._argv,
            PROCESS_INDEX_FLAG,
            str(child.index),
            SUPERVISOR_PID_FLAG,
            str(os.getpid()),
        ]

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every running child."""
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop supervising: no more restarts; ``sig`` goes to every child."""
        if not self._stopping.is_set():
            log.info("%s: stopping %d relay processes", sig.name, len(self.children))
        self._signal = sig
        self._stopping.set()
        self.send(sig)

    async def run(self) -> int:
        """Supervise until :meth:`stop`, then wait for the children; 0 if all exited 0."""
        tasks = [asyncio.create_task(self._keep(c), name=c.node_id) for c in self.children]
        try:
            await self._stopping.wait()
            _, pending = await asyncio.wait(tasks, timeout=self._stop_timeout)
            if pending:
                for child in self.children:
                    if child.proc is not None and child.proc.returncode is None:
                        log.error(
                            "relay process %d (node %s, pid %d) did not stop within %.0f s; "
                            "killing it",
                            child.index,
                            child.node_id,
                            child.proc.pid,
                            self._stop_timeout,
                        )
                        with contextlib.suppress(ProcessLookupError):
                            child.proc.kill()
                await asyncio.wait(pending)
        finally:
            for task in tasks:
                task.cancel()
            for child in self.children:  # only if run() itself was cancelled
                if child.proc is not None and child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
        clean = all(c.exits and c.exits[-1] == 0 for c in self.children)
        return 0 if clean else 1

    async def _keep(self, child: Child) -> None:
        """Run ``child`` again and again until stopping."""
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            outcome = await self._run_once(child)
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self._healthy:
                failures = 0
            delay = self._delays[min(failures, len(self._delays) - 1)]
            failures += 1
            log.error(
                "relay process %d (node %s) %s after %.1f s; restarting it in %.1f s "
                "(restart %d in a row); its devices reconnect to the other processes",
                child.index,
                child.node_id,
                outcome,
                time.monotonic() - started,
                delay,
                failures,
            )
            with contextlib.suppress(TimeoutError):
                # A backoff period, not synchronisation; stop() ends it at once.
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_once(self, child: Child) -> str:
        """Start ``child`` and wait for it to exit; say how it ended."""
        try:
            proc = await asyncio.create_subprocess_exec(*self._argv_of(child))
        except OSError as exc:
            return f"could not start ({exc})"
        child.proc = proc
        child.pids.append(proc.pid)
        self.changed.set()
        if self._stopping.is_set():  # stop() ran while it was being started
            proc.send_signal(self._signal)
        log.info("relay process %d (node %s) started: pid %d", child.index, child.node_id, proc.pid)
        code = await proc.wait()
        child.exits.append(code)
        self.changed.set()
        if self._stopping.is_set():
            log.info(
                "relay process %d (node %s, pid %d) stopped: %s",
                child.index,
                child.node_id,
                proc.pid,
                describe_exit(code),
            )
        return f"(pid {proc.pid}) exited unexpectedly: {describe_exit(code)}"


def stop_timeout(config: Config) -> float:
    """How long a stopping child may take before the supervisor kills it.

    A child drains (``node.drain_delay_seconds``), lets calls finish
    (``node.grace_seconds``) and closes the rest within SHUTDOWN_MARGIN_SECONDS.
    """
    from relay.common.grpcserver import SHUTDOWN_MARGIN_SECONDS  # noqa: PLC0415

    node = config.node
    return (
        node.drain_delay_seconds
        + node.grace_seconds
        + SHUTDOWN_MARGIN_SECONDS
        + STOP_MARGIN_SECONDS
    )


async def supervise(config: Config, argv: Sequence[str], count: int) -> int:
    """Run ``count`` children of ``relayd relay`` (``argv`` its arguments) until a signal.

    ``config`` must have passed :func:`check_shareable`. Returns the process exit code.
    """
    command = [sys.executable, "-m", "relay.cli.relayd", *argv]
    ids = [node_id(config.node.id, i) for i in range(count)]
    supervisor = Supervisor(command, ids, stop_timeout=stop_timeout(config))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.stop, sig)
    loop.add_signal_handler(signal.SIGHUP, supervisor.send, signal.SIGHUP)
    log.info(
        "supervising %d relay processes (nodes %s .. %s) sharing %s",
        count,
        ids[0],
        ids[-1],
        config.node.listen,
    )
    return await supervisor.run()
