"""The slow-reader scenario's memory meter and relay limits (``loadtest/slowreader.py``)."""

from __future__ import annotations

import os
import tomllib

import pytest

from loadtest import slowreader


def test_the_peak_includes_a_spike_between_samples() -> None:
    meter = slowreader.PeakRss(os.getpid())
    if not meter.hwm_reset:
        pytest.skip("/proc/PID/clear_refs not writable here: the meter falls back to samples")
    spike = b"\x01" * (64 * 1024 * 1024)  # written, so resident; freed before any sample
    del spike
    assert meter.source == "VmHWM"
    assert meter.peak_mib() - meter.base_mib >= 60


def test_without_the_high_water_mark_the_peak_is_the_highest_sample() -> None:
    meter = slowreader.PeakRss(os.getpid())
    meter.hwm_reset = False
    held = b"\x01" * (32 * 1024 * 1024)
    high = meter.sample()
    del held
    assert meter.source == "VmRSS samples"
    assert meter.peak_mib() == pytest.approx(max(high, meter.base_mib))


def test_the_limits_are_a_relay_limits_section() -> None:
    parsed = tomllib.loads(slowreader.limits_toml())
    assert parsed == {"limits": slowreader.LIMITS}
    assert tomllib.loads(slowreader.limits_toml({"write_stall_seconds": 1})) == {
        "limits": {"write_stall_seconds": 1}
    }
