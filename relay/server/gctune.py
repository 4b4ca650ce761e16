"""Garbage-collector settings of a relay process, applied once its servers are up.

CPython's cyclic collector runs a full (generation 2) collection over every tracked
object, and a relay holds many long-lived ones (grpc.aio calls, coroutines and contexts of
every open stream, imported modules, caches): at saturation full collections paused the
event loop for 98-305 ms (``make bench``, docs/benchmarks.md), and every pause is a latency
spike for every stream. So, after start-up:

- ``gc.freeze()`` moves everything alive then (modules, servers, stores) to the permanent
  generation, which no collection scans again;
- ``gc.set_threshold`` raises the gen-0 threshold from 700 to ``DEFAULT_THRESHOLDS[0]``
  allocations, so young collections run far less often (each still short: it scans only
  the young objects), and promotes less to the older generations.

Reference cycles are still collected; only less often. The ``RELAY_GC`` environment
variable overrides it (see ``from_env``), e.g. ``RELAY_GC=default`` to keep Python's own
settings when comparing, or ``RELAY_GC=20000,10,10``.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from relay.config import ConfigError

log = logging.getLogger(__name__)

#: Gen-0, gen-1 and gen-2 thresholds after start-up (Python's defaults: 700, 10, 10).
DEFAULT_THRESHOLDS = (50_000, 20, 100)
#: The environment variable that overrides the settings.
ENV = "RELAY_GC"


@dataclass(frozen=True, slots=True)
class GcSettings:
    """What ``apply`` does: freeze the start-up heap, and which thresholds to set."""

    freeze: bool = True
    #: None: leave the interpreter's thresholds as they are.
    thresholds: tuple[int, int, int] | None = DEFAULT_THRESHOLDS


def from_env(environ: Mapping[str, str] | None = None) -> GcSettings:
    """The settings ``RELAY_GC`` asks for.

    Unset or ``tuned``: freeze and ``DEFAULT_THRESHOLDS``. ``default``: change nothing.
    ``freeze``: freeze only. ``T0,T1,T2``: freeze and these thresholds. Raises ConfigError
    naming the variable on anything else.
    """
    value = (os.environ if environ is None else environ).get(ENV, "tuned").strip().lower()
    if value in ("", "tuned"):
        return GcSettings()
    if value == "default":
        return GcSettings(freeze=False, thresholds=None)
    if value == "freeze":
        return GcSettings(thresholds=None)
    parts = value.split(",")
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or numbers[0] <= 0 or min(numbers) < 0:
        raise ConfigError(
            f"{ENV}={value!r}: expected tuned, default, freeze or three thresholds T0,T1,T2 "
            "(T0 > 0)"
        )
    return GcSettings(thresholds=(numbers[0], numbers[1], numbers[2]))


def apply(settings: GcSettings) -> None:
    """Apply ``settings`` now (call once the servers are up, before taking traffic)."""
    if settings.freeze:
        gc.collect()  # what is garbage now must not be frozen with the rest
        gc.freeze()
    if settings.thresholds is not None:
        gc.set_threshold(*settings.thresholds)
    log.info(
        "gc: %d objects frozen, thresholds %s",
        gc.get_freeze_count(),
        gc.get_threshold(),
    )
