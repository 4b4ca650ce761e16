"""What the command-line tools share about their output: ``--version``, closed pipes.

``relayd config | head -1`` closes the pipe before relayd has printed everything;
:func:`quiet_broken_pipe` makes a tool exit at once, without a BrokenPipeError
traceback, as a C tool killed by SIGPIPE would (status 141). It does not ignore
SIGPIPE process-wide: a server must keep running when a peer socket closes.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: The distribution whose version ``--version`` prints.
DISTRIBUTION = "e2ee-relay"
#: Exit status after the reader of stdout went away (128 + SIGPIPE, as shells report).
BROKEN_PIPE_STATUS = 141

F = TypeVar("F", bound=Callable[..., int])


def git_commit(root: Path | None = None) -> str:
    """The commit checked out in the source tree at ``root`` (12 hex digits), else "".

    Read from the ``.git`` files (no subprocess): only a source checkout (an editable
    install) has one; an installed wheel prints its version alone.
    """
    base = root if root is not None else Path(__file__).resolve().parents[2]
    git = base / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = (base / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head.removeprefix("ref: ")
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for place in (git, common):
            if (place / ref).is_file():
                return (place / ref).read_text().strip()[:12]
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0][:12]
    except (OSError, IndexError):
        return ""
    return ""


def version_text(prog: str) -> str:
    """``PROG VERSION`` and, from a source checkout, `` (git COMMIT)``."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    commit = git_commit()
    return f"{prog} {version}" + (f" (git {commit})" if commit else "")


def quiet_broken_pipe(main: F) -> F:
    """Decorate a CLI ``main``: a closed stdout ends it quietly with status 141."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int:
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null so that
            # this flush cannot fail (and print the traceback this avoids).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return BROKEN_PIPE_STATUS
        return status

    return wrapper  # type: ignore[return-value]
