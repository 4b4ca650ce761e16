"""LocalPresence: the presence conformance suite (one process)."""

from __future__ import annotations

import pytest

from relay.core.presence_local import LocalPresence
from tests.conformance.presence import PresenceConformance


class TestLocalPresence(PresenceConformance):
    SHARED = False

    @pytest.fixture
    def presence(self) -> LocalPresence:
        return LocalPresence()
