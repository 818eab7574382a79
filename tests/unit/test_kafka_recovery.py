"""``kafka_io.recover_lost_assignment``: it asks for a rejoin exactly in the state kafka-python 3.0 can be left in
(a finished group join whose assignment was never applied, no rejoin pending), and the library still has the
internals it reads."""

from __future__ import annotations

import inspect
import threading

import pytest
from kafka.coordinator.base import BaseCoordinator
from kafka.coordinator.consumer import ConsumerCoordinator

from pipeline.kafka_io import recover_lost_assignment


class _Task:
    def __init__(self, done: bool) -> None:
        self.is_done = done


class _Coordinator:
    def __init__(self, task: _Task | None, rejoin_pending: bool) -> None:
        self._join_task, self._pending, self.requested = task, rejoin_pending, False

    def need_rejoin(self) -> bool:
        return self._pending

    def request_rejoin(self) -> None:
        self.requested = True


class _Consumer:
    def __init__(self, coordinator: object) -> None:
        self._coordinator = coordinator


@pytest.mark.parametrize(("task", "pending", "expected"), [
    (_Task(done=True), False, True),  # the lost assignment: finished, never taken up, nothing pending
    (_Task(done=False), False, False),  # a join still in flight: the next poll waits for it
    (_Task(done=True), True, False),  # finished while a rejoin is pending: the next poll takes it up
    (None, False, False),  # the usual state between rebalances
])
def test_a_rejoin_is_requested_only_for_a_finished_join_that_was_never_taken_up(
        task: _Task | None, pending: bool, expected: bool) -> None:
    coordinator = _Coordinator(task, pending)
    assert recover_lost_assignment(_Consumer(coordinator)) is expected  # type: ignore[arg-type]
    assert coordinator.requested is expected


def test_a_consumer_without_those_internals_is_left_alone() -> None:
    assert recover_lost_assignment(object()) is False  # type: ignore[arg-type]


def test_the_installed_kafka_python_still_has_the_internals_it_reads() -> None:
    assert "self._join_task = None" in inspect.getsource(BaseCoordinator.__init__)
    assert callable(ConsumerCoordinator.need_rejoin) and callable(BaseCoordinator.request_rejoin)
    assert ".is_done" in inspect.getsource(BaseCoordinator.join_group_async)


def test_waiting_for_the_topic_warns_and_reports_in_each_time() -> None:
    """While the topic has no partitions the wait warns every warn_every_s and calls while_waiting (the process
    refreshes its pipeline_instances row, so `models serving` does not call it gone); it returns the partitions."""
    from pipeline.kafka_io import wait_for_partitions

    answers = iter([None, set(), None, None, {0, 1}])

    class Metadata:  # the one consumer call the wait makes
        def partitions_for_topic(self, topic: str) -> set[int] | None:
            assert topic == "readings"
            return next(answers)

    calls: list[int] = []
    found = wait_for_partitions(Metadata(), "readings", threading.Event(), interval_s=0.25,  # type: ignore[arg-type]
                                warn_every_s=0.5, while_waiting=lambda: calls.append(1))
    assert found == {0, 1} and len(calls) == 2  # at waits 0 and 2 of 4


def test_the_lag_while_waiting_counts_the_batch_held_in_hand() -> None:
    """A stalled loop has polled a batch it cannot process yet: its records are lag too, counted from its first
    offset; a partition without a batch in hand counts from the position."""
    from kafka.structs import TopicPartition

    from pipeline import kafka_io

    first, second = TopicPartition("t", 0), TopicPartition("t", 1)

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return {first, second}

        def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
            return {first: 1000, second: 50}

        def position(self, tp: TopicPartition, timeout_ms: int) -> int:
            return {first: 900, second: 40}[tp]

    consumer = Consumer()
    assert kafka_io.lag_to_end(consumer) == {0: 100, 1: 10}  # type: ignore[arg-type]
    assert kafka_io.lag_to_end(consumer, in_hand={0: 400}) == {0: 600, 1: 10}  # type: ignore[arg-type]
