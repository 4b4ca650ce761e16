"""relay.server.gctune: what RELAY_GC selects, and that applying it freezes and sets."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from relay.config import ConfigError
from relay.server import gctune
from relay.server.gctune import DEFAULT_THRESHOLDS, GcSettings, from_env


def test_settings_from_the_environment() -> None:
    assert from_env({}) == GcSettings(freeze=True, thresholds=DEFAULT_THRESHOLDS)
    assert from_env({"RELAY_GC": "tuned"}) == from_env({})
    assert from_env({"RELAY_GC": "default"}) == GcSettings(freeze=False, thresholds=None)
    assert from_env({"RELAY_GC": "freeze"}) == GcSettings(freeze=True, thresholds=None)
    assert from_env({"RELAY_GC": " 20000, 5,50"}).thresholds == (20_000, 5, 50)


@pytest.mark.parametrize("bad", ["on", "1,2", "0,10,10", "a,b,c", "1,2,3,4", "5,-1,3"])
def test_bad_values_name_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="RELAY_GC"):
        from_env({"RELAY_GC": bad})


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_apply_freezes_the_heap_and_sets_thresholds() -> None:
    gctune.apply(GcSettings(freeze=True, thresholds=(12_345, 6, 7)))
    assert gc.get_threshold() == (12_345, 6, 7)
    assert gc.get_freeze_count() > 1000


@pytest.mark.usefixtures("restore_gc")
def test_default_changes_nothing() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    gctune.apply(GcSettings(freeze=False, thresholds=None))
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == frozen
