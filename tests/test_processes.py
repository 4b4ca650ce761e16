"""``relayd relay --processes N``: per-child config, refusals, and the supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from relay.cli import relayd
from relay.config import Config, ConfigError, load
from relay.server.processes import (
    Supervisor,
    check_shareable,
    describe_exit,
    node_config,
)

SHARED = {
    "storage.backend": "cassandra",
    "presence.backend": "redis",
    "node.id": "edge",
    "node.listen": "0.0.0.0:50051",
}


def shared(**overrides: object) -> Config:
    return load(None, {**SHARED, **{k.replace("__", "."): v for k, v in overrides.items()}})


def test_child_config_moves_link_and_metrics_ports_up_by_its_index() -> None:
    config = shared(
        node__link_listen="0.0.0.0:50053",
        node__link_advertise="10.0.0.5:50053",
        metrics__listen="127.0.0.1:9464",
    )
    child = node_config(config, 2)
    assert child.node.id == "edge-2"
    assert child.node.listen == "0.0.0.0:50051"  # shared by all
    assert child.node.link_listen == "0.0.0.0:50055"
    assert child.node.link_advertise == "10.0.0.5:50055"
    assert child.metrics.listen == "127.0.0.1:9466"
    assert node_config(config, 0).node.link_listen == "0.0.0.0:50053"


def test_port_zero_stays_a_free_port_per_child_and_off_stays_off() -> None:
    child = node_config(shared(metrics__listen="off"), 1)
    assert child.node.link_listen == "127.0.0.1:0"  # the default; presence says where
    assert child.node.link_advertise == ""
    assert child.metrics.listen == "off"


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"storage__backend": "embedded"}, "storage.backend", "cassandra"),
        ({"presence__backend": "local"}, "presence.backend", "redis"),
        ({"node__listen": "127.0.0.1:0"}, "node.listen", "one port"),
        ({"node__link_advertise": "10.0.0.5:50053"}, "node.link_advertise", "port"),
        ({"node__link_listen": "0.0.0.0:65534"}, "node.link_listen", "65535"),
    ],
)
def test_what_processes_cannot_share_is_refused_naming_the_key(
    overrides: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_shareable(shared(**overrides), 3)
    assert str(err.value).startswith(key)
    assert words in str(err.value)


def test_tls_is_refused_since_a_node_certificate_names_one_node(tmp_path: Path) -> None:
    config = shared(tls__cert_file=str(tmp_path / "c.pem"), tls__key_file=str(tmp_path / "k"))
    with pytest.raises(ConfigError, match=r"tls.cert_file: .* edge-0 \.\. edge-2"):
        check_shareable(config, 3)


def test_a_shareable_config_passes() -> None:
    check_shareable(shared(node__link_listen="0.0.0.0:50053"), 4)


def test_relayd_refuses_processes_on_embedded_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = relayd.main(["relay", "--data-dir", str(tmp_path), "--processes", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "configuration error: storage.backend: 'embedded' cannot be shared by --processes 3" in err
    )
    assert "storage.backend" in err and "--processes 3" in err and "cassandra" in err


def test_processes_counts(capsys: pytest.CaptureFixture[str]) -> None:
    args = relayd._parser().parse_args(["relay", "--processes", "auto"])
    assert args.processes >= 1
    assert relayd._parser().parse_args(["relay"]).processes == 1
    with pytest.raises(SystemExit):
        relayd._parser().parse_args(["relay", "--processes", "0"])
    assert "at least 1" in capsys.readouterr().err


def test_exit_descriptions() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "exit code -9 (killed by SIGKILL)"


# Children of these tests are tiny Python programs; the supervisor appends
# --process-index I --supervisor-pid P to their argv. Once its signal handling is set up,
# a child says "INDEX PID" on a connection to the test's Ready server.
READY = """
import os, socket, sys
index = sys.argv[sys.argv.index("--process-index") + 1]
ready = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
ready.sendall(f"{index} {os.getpid()}\\n".encode())
"""

SERVE_UNTIL_SIGTERM = (
    """
import pathlib, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait
index = sys.argv[sys.argv.index("--process-index") + 1]
marker = pathlib.Path(sys.argv[1]) / f"ran-{index}"
if index == "0" and not marker.exists():
    marker.write_text("once")
    sys.exit(3)  # child 0 crashes once, at once
"""
    + READY
    + """
signal.sigwait({signal.SIGTERM})
"""
)

IGNORE_SIGTERM = (
    """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
"""
    + READY
    + """
signal.pause()
"""
)


class Ready:
    """A loopback server the test children report to once they are set up."""

    def __init__(self) -> None:
        self.reports: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self.readers: dict[int, asyncio.StreamReader] = {}
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Ready:
        self._server = await asyncio.start_server(self._report, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> str:
        return str(self._server.sockets[0].getsockname()[1])

    async def _report(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        index, pid = (await reader.readline()).split()
        self.readers[int(pid)] = reader
        await self.reports.put((int(index), int(pid)))

    async def gone(self, pid: int, seconds: float = 20) -> None:
        """Wait until child ``pid`` has exited (its connection reaches EOF)."""
        assert await asyncio.wait_for(self.readers[pid].read(), seconds) == b""

    async def next(self, seconds: float = 20) -> tuple[int, int]:
        """The next child to be ready: (index, pid)."""
        return await asyncio.wait_for(self.reports.get(), seconds)


async def test_a_crashed_child_is_restarted_and_sigterm_stops_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayd.processes")
    async with Ready() as ready:
        supervisor = Supervisor(
            [sys.executable, "-c", SERVE_UNTIL_SIGTERM, str(tmp_path), ready.port],
            ["n-0", "n-1"],
            stop_timeout=20,
            restart_delays=(0.01,),
        )
        run = asyncio.create_task(supervisor.run())
        first, second = supervisor.children
        assert sorted([await ready.next(), await ready.next()]) == [
            (0, first.pids[1]),
            (1, second.pids[0]),
        ]
        assert first.exits == [3]
        crashed = f"relay process 0 (node n-0) (pid {first.pids[0]}) exited unexpectedly: "
        assert crashed + "exit code 3" in caplog.text
        assert "restarting it in 0.0 s (restart 1 in a row)" in caplog.text
        supervisor.stop(signal.SIGTERM)
        assert await asyncio.wait_for(run, 20) == 0
    assert first.exits == [3, 0] and second.exits == [0]
    assert len(first.pids) == 2 and len(second.pids) == 1  # nothing restarted on stop


async def test_a_sigkilled_child_is_restarted_with_its_signal_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayd.processes")
    (tmp_path / "ran-0").write_text("")  # no crash of its own
    async with Ready() as ready:
        supervisor = Supervisor(
            [sys.executable, "-c", SERVE_UNTIL_SIGTERM, str(tmp_path), ready.port],
            ["n-0"],
            stop_timeout=20,
            restart_delays=(0.01,),
        )
        run = asyncio.create_task(supervisor.run())
        (child,) = supervisor.children
        _, pid = await ready.next()
        os.kill(pid, signal.SIGKILL)
        _, restarted = await ready.next()
        assert child.pids == [pid, restarted] and child.exits == [-9]
        assert f"(pid {pid}) exited unexpectedly: exit code -9 (killed by SIGKILL)" in caplog.text
        supervisor.stop(signal.SIGTERM)
        assert await asyncio.wait_for(run, 20) == 0
    assert child.exits == [-9, 0]


async def test_children_that_do_not_stop_are_killed_after_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Ready() as ready:
        supervisor = Supervisor(
            [sys.executable, "-c", IGNORE_SIGTERM, str(tmp_path), ready.port],
            ["n-0", "n-1"],
            stop_timeout=1.0,
        )
        run = asyncio.create_task(supervisor.run())
        await ready.next()
        await ready.next()
        supervisor.stop(signal.SIGTERM)
        assert await asyncio.wait_for(run, 20) == 1
    assert [c.exits for c in supervisor.children] == [[-9], [-9]]
    assert "did not stop within 1 s; killing it" in caplog.text


ORPHAN = (
    """
import signal, sys
from relay.server.processes import die_with_parent
die_with_parent(int(sys.argv[sys.argv.index("--supervisor-pid") + 1]))
"""
    + READY
    + """
signal.pause()
"""
)

SUPERVISE = """
import asyncio, sys
from relay.server.processes import Supervisor
asyncio.run(Supervisor([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], ["n-0", "n-1"],
                       stop_timeout=5).run())
"""


async def test_children_stop_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    async with Ready() as ready:
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SUPERVISE, ORPHAN, str(tmp_path), ready.port
        )
        try:
            children = [await ready.next(), await ready.next()]
        finally:
            parent.kill()
            await parent.wait()
        for _, pid in children:
            await ready.gone(pid)  # SIGTERM from the kernel (PR_SET_PDEATHSIG)
