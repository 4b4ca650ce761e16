"""relayctl as real subprocesses against the real relay node and key directory."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Servers

pytestmark = pytest.mark.integration

RELAYCTL = str(Path(sys.executable).with_name("relayctl"))
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60


@dataclass
class Result:
    code: int
    out: str
    err: str


def env(servers: Servers) -> dict[str, str]:
    return {
        **os.environ,
        "RELAY_ADDR": servers.relay_address,
        "RELAY_KEYS_ADDR": servers.keys_address,
        # The generated relaypb package lives at the repository root.
        "PYTHONPATH": str(REPO),
    }


async def spawn(servers: Servers, home: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        RELAYCTL,
        "--home",
        str(home),
        *args,
        env=env(servers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> Result:
    async with asyncio.timeout(TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def relayctl(servers: Servers, home: Path, *args: str) -> Result:
    return await finish(await spawn(servers, home, *args))


async def init(servers: Servers, home: Path, user: str) -> None:
    result = await relayctl(servers, home, "init", user)
    assert result.code == 0, result.err
    assert result.out == f"registered default/{user}/1 (home {home})\n"


def sent_id(result: Result) -> str:
    assert result.code == 0, result.err
    assert re.fullmatch(r"[0-9a-f]{32}\n", result.out), result.out
    return result.out.strip()


async def test_listen_started_before_send(servers: Servers, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    await init(servers, bob, "bob")
    await init(servers, alice, "alice")
    listen = await spawn(servers, bob, "listen", "--count", "1", "--timeout", str(TIMEOUT))
    assert listen.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        ready = await listen.stderr.readline()
    assert ready.decode().startswith("listening as default/bob/1"), ready
    sent_id(await relayctl(servers, alice, "send", "bob", "hello"))
    result = await finish(listen)
    assert (result.code, result.out) == (0, "alice/1: hello\n")


async def test_listen_started_after_send(servers: Servers, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    await init(servers, bob, "bob")
    await init(servers, alice, "alice")
    sent_id(await relayctl(servers, alice, "send", "bob", "stored \N{SNOWMAN}"))
    result = await relayctl(servers, bob, "listen", "--count", "1", "--timeout", str(TIMEOUT))
    assert (result.code, result.out) == (0, "alice/1: stored \N{SNOWMAN}\n"), result.err
    # Taken once: the next listen sees only the next message.
    sent_id(await relayctl(servers, alice, "send", "bob", "next"))
    result = await relayctl(servers, bob, "listen", "--count", "1", "--timeout", str(TIMEOUT))
    assert (result.code, result.out) == (0, "alice/1: next\n"), result.err


async def test_whoami_and_devices(servers: Servers, tmp_path: Path) -> None:
    await init(servers, tmp_path / "bob", "bob")
    whoami = await relayctl(servers, tmp_path / "bob", "whoami")
    assert whoami.code == 0
    assert whoami.out.startswith(f"default/bob/1 (home {tmp_path / 'bob'})\nidentity key ")
    devices = await relayctl(servers, tmp_path / "bob", "devices", "bob")
    assert devices.code == 0
    assert devices.out.startswith("default/bob/1  registered ")
    assert whoami.out.split()[-1] in devices.out  # the same identity key


def one_line_error(result: Result) -> str:
    assert result.code == 1, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relayctl: error: "), result.err
    return lines[0]


async def test_expected_errors_are_one_line(servers: Servers, tmp_path: Path) -> None:
    bob = tmp_path / "bob"
    await init(servers, bob, "bob")
    line = one_line_error(await relayctl(servers, bob, "init", "bob"))
    assert "already holds device default/bob/1" in line and "--force" in line
    forced = one_line_error(await relayctl(servers, bob, "init", "bob", "--force"))
    assert "exists already" in forced and f"relayctl --home {bob} link bob" in forced
    line = one_line_error(await relayctl(servers, bob, "send", "carol", "hi"))
    assert "carol" in line and "no registered devices" in line
    line = one_line_error(await relayctl(servers, tmp_path / "none", "send", "bob", "hi"))
    assert "init" in line
    assert not (tmp_path / "none").exists()
    line = one_line_error(
        await relayctl(servers, bob, "--relay", "127.0.0.1:1", "send", "bob", "x")
    )
    assert "relay 127.0.0.1:1 is unreachable" in line and "make run" in line
    usage = await relayctl(servers, bob, "send")
    assert usage.code == 2 and "usage:" in usage.err


async def test_chat_between_two_terminals(servers: Servers, tmp_path: Path) -> None:
    """Two `relayctl chat` processes: lines typed on one print on the other."""
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    await init(servers, alice, "alice")
    await init(servers, bob, "bob")

    async def chat(home: Path, peer: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            RELAYCTL,
            "--home",
            str(home),
            "chat",
            peer,
            env=env(servers),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            banner = (await proc.stderr.readline()).decode()
        assert banner.startswith(f"chatting with {peer} as default/"), banner
        assert "end-to-end encrypted" in banner
        return proc

    async def say(proc: asyncio.subprocess.Process, text: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(text.encode() + b"\n")
        await proc.stdin.drain()

    async def line(proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            return (await proc.stdout.readline()).decode()

    a, b = await chat(alice, "bob"), await chat(bob, "alice")
    await say(a, "hi bob \N{SNOWMAN}")
    assert await line(b) == "alice/1: hi bob \N{SNOWMAN}\n"
    await say(b, "hi alice")
    assert await line(a) == "bob/1: hi alice\n"
    for proc in (a, b):
        assert proc.stdin is not None
        proc.stdin.close()  # Ctrl-D
        result = await finish(proc)
        assert result.code == 0, result.err


async def test_link_and_approve_then_the_new_device_receives(
    servers: Servers, tmp_path: Path
) -> None:
    alice, bob, phone = tmp_path / "alice", tmp_path / "bob", tmp_path / "phone"
    await init(servers, alice, "alice")
    await init(servers, bob, "bob")
    link = await spawn(servers, phone, "link", "bob")
    assert link.stdout is not None
    async with asyncio.timeout(TIMEOUT):
        first = (await link.stdout.readline()).decode()
    match = re.fullmatch(r"link code: ([A-Z2-7]{5}-[A-Z2-7]{5})\n", first)
    assert match, first
    # A wrong code approves nothing; the right one links the phone.
    wrong = one_line_error(await relayctl(servers, bob, "approve", "AAAAA-AAAAA"))
    assert "no link request with code AAAAA-AAAAA" in wrong
    approved = await relayctl(servers, bob, "approve", match.group(1).lower())
    assert approved.code == 0, approved.err
    assert approved.out == "approved default/bob/2\n"
    linked = await finish(link)
    assert linked.code == 0, linked.err
    assert linked.out == f"linked default/bob/2 (home {phone})\n"
    listen = await spawn(servers, phone, "listen", "--count", "1", "--timeout", str(TIMEOUT))
    assert listen.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        assert (await listen.stderr.readline()).startswith(b"listening as default/bob/2")
    sent = await relayctl(servers, alice, "send", "bob", "to every device of bob")
    sent_id(sent)
    heard = await finish(listen)
    assert heard.code == 0, heard.err
    assert heard.out == "alice/1: to every device of bob\n"
    # Both ends print the same safety number.
    mine = await relayctl(servers, alice, "safety-number", "bob")
    theirs = await relayctl(servers, phone, "safety-number", "alice")
    assert mine.code == 0 and theirs.code == 0, (mine.err, theirs.err)
    assert mine.out == theirs.out and re.fullmatch(r"(\d{5} ){11}\d{5}\n", mine.out)
    removed = await relayctl(servers, phone, "remove-device", "1")
    assert removed.out == "removed default/bob/1\n", removed.err
