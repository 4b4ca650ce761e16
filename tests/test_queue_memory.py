"""MemoryQueue: the queue conformance suite, in memory."""

from __future__ import annotations

import pytest

from relay.clock import FakeClock
from relay.core.ports import MessageQueue
from relay.stores.memory_queue import MemoryQueue
from tests.conformance.queue import NOW, QueueConformance


class TestMemoryQueue(QueueConformance):
    @pytest.fixture
    def queue(self) -> MemoryQueue:
        return MemoryQueue(clock=FakeClock(NOW))


def test_it_is_a_message_queue() -> None:
    queue: MessageQueue = MemoryQueue()
    assert queue is not None
