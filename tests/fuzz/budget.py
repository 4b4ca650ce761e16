"""How much to fuzz: ``FUZZ_EXAMPLES`` generated requests per RPC and kind of input.

Each Hypothesis example sends a batch of ``BATCH`` requests and then checks that the
servers still serve, so a test runs ``ceil(FUZZ_EXAMPLES / BATCH)`` examples. Without
``FUZZ_EXAMPLES`` (``make test``) the run is derandomized: the same inputs every time,
so CI fails only on a change of the code. With it (``make fuzz``) every run explores
new inputs, and the example database in ``.hypothesis/`` replays past failures first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings

#: Generated requests per RPC and kind of input.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
#: Requests per Hypothesis example.
BATCH = 5
#: Seconds allowed per test: generous, but a hang still ends the run.
TIMEOUT_SECONDS = max(300.0, EXAMPLES * 0.2)

F = TypeVar("F", bound=Callable[..., Any])


def fuzz_settings(*, shrink: bool = True, examples: int = EXAMPLES) -> Callable[[F], F]:
    """Hypothesis settings of a fuzz test sending ``examples`` requests in batches.

    ``shrink=False`` for a test expected to fail (``xfail``): it stops at the first
    failure instead of spending calls on a minimal one.
    """
    phases = tuple(Phase) if shrink else tuple(p for p in Phase if p is not Phase.shrink)
    chosen = settings(
        max_examples=max(1, math.ceil(examples / BATCH)),
        deadline=None,
        derandomize="FUZZ_EXAMPLES" not in os.environ,
        phases=phases,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )

    def apply(test: F) -> F:
        return pytest.mark.timeout(TIMEOUT_SECONDS)(chosen(test))

    return apply
