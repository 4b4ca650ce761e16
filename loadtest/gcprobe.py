"""Run a Python module with its garbage-collection pauses recorded (a bench probe).

``python -m loadtest.gcprobe OUT.json MODULE [ARGS...]`` runs ``MODULE`` as ``__main__``
with a ``gc.callbacks`` hook that times every collection, and writes per generation the
count, total and longest pause (ms) to ``OUT.json`` when the module exits (and every
``FLUSH_EVERY`` collections, so a killed process still leaves figures). The hook costs a
few microseconds per collection; the module itself is not changed.
"""

from __future__ import annotations

import atexit
import gc
import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any

FLUSH_EVERY = 200


class Pauses:
    """Collection pauses per generation."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.stats = {g: {"count": 0, "total_ms": 0.0, "max_ms": 0.0} for g in range(3)}
        self._started = 0.0
        self._seen = 0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """The ``gc.callbacks`` hook."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000
        s = self.stats[int(info["generation"])]
        s["count"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)
        self._seen += 1
        if self._seen % FLUSH_EVERY == 0:
            self.write()

    def write(self) -> None:
        """Write the figures so far."""
        data = {f"gen{g}": {k: round(v, 3) for k, v in s.items()} for g, s in self.stats.items()}
        self.out.write_text(json.dumps(data))


def main() -> None:
    """``python -m loadtest.gcprobe OUT.json MODULE [ARGS...]``."""
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    pauses = Pauses(Path(sys.argv[1]))
    gc.callbacks.append(pauses.on_gc)
    atexit.register(pauses.write)
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
