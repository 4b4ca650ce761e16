"""``--version`` on every tool, and no BrokenPipeError when stdout's reader goes away."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli.output import BROKEN_PIPE_STATUS, git_commit

pytestmark = pytest.mark.integration

VERSION = importlib.metadata.version("e2ee-relay")
TOOLS = {
    "relayd": "relay.cli.relayd",
    "relayctl": "relay.cli.relayctl",
    "relay-loadtest": "loadtest.cli",
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_version(tool: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", TOOLS[tool], "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[:2] == [tool, VERSION], done.stdout
    commit = git_commit()
    if commit:  # a source checkout: the commit too
        assert f"(git {commit})" in done.stdout


def test_git_commit_reads_refs_without_git(tmp_path: Path) -> None:
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert git_commit(tmp_path) == ""  # no such ref yet
    (tmp_path / ".git" / "packed-refs").write_text(f"{'ab' * 20} refs/heads/main\n")
    assert git_commit(tmp_path) == "ab" * 6
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("cd" * 20 + "\n")
    assert git_commit(tmp_path) == "cd" * 6
    (tmp_path / ".git" / "HEAD").write_text("ef" * 20 + "\n")  # detached
    assert git_commit(tmp_path) == "ef" * 6
    assert git_commit(tmp_path / "elsewhere") == ""


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "relay.cli.relayd", "config"],
        [sys.executable, "-m", "relay.cli.relayd", "--help"],
        [sys.executable, "-m", "relay.cli.relayctl", "--help"],
    ],
    ids=["relayd config", "relayd --help", "relayctl --help"],
)
def test_a_closed_pipe_is_not_a_traceback(argv: list[str]) -> None:
    """``relayd config | head -1``, with the reader gone before anything is written."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the tool starts: every write fails
    try:
        done = subprocess.run(
            argv, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False
        )
    finally:
        os.close(write)
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == ""
    assert done.returncode in (0, BROKEN_PIPE_STATUS), done.returncode


def test_relayd_config_piped_to_head_prints_one_line() -> None:
    done = subprocess.run(
        f"{sys.executable} -m relay.cli.relayd config | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout == "{\n"
    assert done.stderr == ""
