"""Hostile input on every RPC of the relay and the key directory (Hypothesis).

The methods are read from the service descriptors at import time, so an RPC added to
``proto/`` is fuzzed as soon as ``relaypb/`` is regenerated. ``FUZZ_EXAMPLES`` sets the
generated requests per RPC and kind of input (default 500; ``make fuzz``: 10,000).
"""
