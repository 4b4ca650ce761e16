"""What machine and which versions a figure was measured on (for reports and the bench)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("e2ee-relay", "grpcio", "protobuf", "uvloop", "hdrhistogram", "cryptography")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_kb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model and count, memory, kernel and Python of this machine."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_kb": _mem_total_kb(),
        "kernel": platform.release(),
        "system": platform.system(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


def git_commit(cwd: Path | None = None) -> str | None:
    """The checked-out commit (with ``-dirty`` when the tree has changes), if in git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def versions() -> dict[str, str | None]:
    """Versions of the packages the figures depend on, and the git commit."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["git_commit"] = git_commit(Path(__file__).resolve().parent)
    # A bench run from an exported tree (not a git checkout) says what it was exported from.
    out["source"] = os.environ.get("LOADTEST_SOURCE") or None
    return out


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
