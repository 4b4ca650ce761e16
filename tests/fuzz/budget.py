"""How much to fuzz: ``FUZZ_EXAMPLES`` generated requests per RPC and kind of input.

Each Hypothesis example sends a batch of ``BATCH`` requests and then checks that the
servers still serve, so a test runs ``ceil(FUZZ_EXAMPLES / BATCH)`` examples.

Without ``FUZZ_EXAMPLES`` (``make test``: 200) the run is derandomized, the same inputs
every time, and a failure is reported as generated, without shrinking: CI fails fast
and only on a change of the code. With it (``make fuzz``) every run explores new
inputs, failures are shrunk to a minimal request, and the example database in
``.hypothesis/`` replays past failures first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings

#: Generated requests per RPC and kind of input.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
#: Whether this run explores (random inputs, shrinking) rather than repeats CI's inputs.
EXPLORE = "FUZZ_EXAMPLES" in os.environ
#: Requests per Hypothesis example.
BATCH = 10
#: Seconds allowed per test: generous (shrinking included), but a hang still ends it.
TIMEOUT_SECONDS = max(600.0, EXAMPLES * 0.2)

F = TypeVar("F", bound=Callable[..., Any])


def fuzz_settings(*, examples: int = EXAMPLES, expect_failure: bool = False) -> Callable[[F], F]:
    """Hypothesis settings of a fuzz test sending ``examples`` requests in batches.

    ``expect_failure`` for a test marked ``xfail``: it never shrinks, so it stops at
    the first failure instead of spending calls on a minimal one.
    """
    shrink = EXPLORE and not expect_failure
    chosen = settings(
        max_examples=max(1, math.ceil(examples / BATCH)),
        deadline=None,
        derandomize=not EXPLORE,
        phases=tuple(p for p in Phase if shrink or p is not Phase.shrink),
        report_multiple_bugs=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )

    def apply(test: F) -> F:
        marked: F = pytest.mark.timeout(TIMEOUT_SECONDS)(chosen(test))
        return marked

    return apply
