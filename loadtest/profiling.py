"""Sampling a running server with py-spy, and reading the hot spots off the samples.

``py-spy record --threads --format raw`` writes one line per distinct stack:
``thread (TID): NAME;frame;frame;... COUNT`` with frames as ``function (file:line)``.
Hot spots are reported per function (lines folded): *self* is the share of all samples
whose innermost frame is the function, *inclusive* the share whose stack contains it
(thread and event-loop plumbing left out).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (None if py-spy is missing)."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--threads", "--format", "raw", "--output", str(out),
        "--nonblocking",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


#: Frames every sample of a thread passes through: left out of the inclusive ranking.
PLUMBING = (
    "(threading.py)",
    "(<frozen runpy>)",
    "(loadtest/gcprobe.py)",
    "(asyncio/runners.py)",
    "(asyncio/events.py)",
    "(uvloop/__init__.py)",
    "(concurrent/futures/thread.py)",
    "(relay/cli/relayd.py)",
)


def hot_spots(raw: str, top: int = 15) -> dict[str, Any]:
    """Per-thread sample shares and the top functions by self and inclusive samples."""
    total = 0
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", frames[0])
        thread = re.sub(r"[-_]?\d+$", "", thread)  # fold numbered pool threads together
        funcs = [_short(f) for f in frames[1:]]
        total += count
        threads[thread] += count
        if funcs:
            own[funcs[-1]] += count
        for func in set(funcs):
            if not func.endswith(PLUMBING):
                inclusive[func] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": n, "pct": round(100 * n / max(total, 1), 1)}
            for f, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "threads": share(threads),
        "self": share(own),
        "inclusive": share(inclusive),
    }
