"""HOOK (b): store-and-forward on Cassandra against a raw cassandra-driver loop.

Not measured yet: the relay's Cassandra queue backend is being written. When it lands,
this is where the comparison goes, with the same generator:

1. Start Cassandra (``make services``) and a relay on the Cassandra backend.
2. Relay side: ``relay-loadtest run`` with ``offline_fraction`` close to 1 (recipients
   offline, so every envelope is stored), a step ladder, ``stop_on_saturation``; read the
   highest sustained acknowledged rate (``acked_per_s`` of the best step).
3. Driver side: a loop of prepared, concurrent (``execute_concurrent_with_args``)
   inserts of the same rows (same partition key, clustering id, payload size and
   consistency LOCAL_QUORUM) into the same table schema, with the same batch size,
   timed over the same duration.
4. ``store_vs_driver_ratio`` = relay rate / driver rate.

Until then :func:`measure` reports ``None`` with the reason, and ``make bench`` carries
that into ``bench/results/latest.json``.
"""

from __future__ import annotations

from typing import Any

REASON = (
    "not measured: the Cassandra store-and-forward backend is not in the relay yet "
    "(storage.backend 'embedded' only); loadtest/storebench.py holds the hook"
)


def measure(**_: Any) -> dict[str, Any]:
    """The (b) figures: ``store_vs_driver_ratio`` (None for now) and the reason."""
    return {"store_vs_driver_ratio": None, "reason": REASON}
