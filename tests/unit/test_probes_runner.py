"""The health probes as the runner drives them: waiting on a dependency is alive, and ready means joined."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import parse_config
from pipeline.errors import TransientError
from pipeline.metrics import PipelineMetrics
from pipeline.runner import Runner
from pipeline.store.db import make_engine, make_sessionmaker


def _runner(unhealthy_after_s: float) -> Runner:
    config = parse_config({"metrics": {"unhealthy_after_s": unhealthy_after_s},
                           "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
    return Runner(config, sessions=make_sessionmaker(make_engine("sqlite://")), detectors={},
                  producer=None, stop=threading.Event(),  # type: ignore[arg-type]
                  metrics=PipelineMetrics(unhealthy_after_s))


def test_livez_stays_up_while_a_dependency_step_blocks_and_fails() -> None:
    """A step that blocks before it fails (a commit waits 30 s for the coordinator, a send 60 s for metadata), plus
    the backoff (up to 30 s), outlasts unhealthy_after_s (60 s) without a finished iteration: that is waiting on a
    dependency, not a hung loop, and /livez must not restart the pipeline for it (scaled down here)."""
    runner = _runner(0.4)
    runner.metrics.mark_started()
    calls = {"n": 0}

    def blocking_step() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            time.sleep(0.3)  # e.g. a commit waiting for a coordinator that does not answer
            raise TransientError("broker down")
        return "done"

    samples: list[tuple[bool, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(runner.metrics.live())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert runner._retry(blocking_step) == "done"
    finally:
        done.set()
        sampler.join()
    assert samples and all(ok for ok, _ in samples), [s for s in samples if not s[0]][:3]
    assert runner.metrics.ready()[0]  # back again


def test_readyz_waits_for_the_consumer_to_join_its_group() -> None:
    """A poll comes back empty while the group's join is still in flight (another member holds up the rebalance):
    not ready until the join completes (``partitions_assigned``, called inside a poll, possibly with nothing)."""
    runner = _runner(60)
    seen: list[bool] = []

    class Consumer:
        polls = 0

        def poll(self, timeout_ms: int = 0, max_records: int = 0) -> dict[object, list[object]]:
            seen.append(runner.metrics.ready()[0])
            self.polls += 1
            if self.polls == 3:
                runner.partitions_assigned(set())  # the join completes: this member got no partition
            if self.polls == 5:
                runner._stop.set()
            return {}

        def assignment(self) -> set[object]:
            return set()

    runner.run(Consumer())  # type: ignore[arg-type]
    assert seen == [False, False, False, True, True]
    assert runner.metrics.ready() == (True, "ok")


def test_a_loop_silent_while_joining_is_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not ready before the join completes, but a loop that polled and then went silent is hung all the same."""
    import pipeline.metrics as module

    metrics = PipelineMetrics(unhealthy_after_s=10)
    metrics.mark_polling()
    assert metrics.live() == (True, "ok") and not metrics.ready()[0]
    now = module.time.monotonic()
    monkeypatch.setattr(module.time, "monotonic", lambda: now + 11)
    assert metrics.live() == (False, "consume loop silent for 11s")


def test_a_stop_while_a_dependency_is_down_does_not_wait_on_the_database() -> None:
    """Removing the pipeline_instances row at a stop is not tried while a step is failing (a database that does
    not answer would hold the stop up beyond the grace period); the row goes stale instead."""
    runner = _runner(60)

    def unreachable() -> None:
        raise AssertionError("the database was asked")

    runner._sessions = unreachable  # type: ignore[assignment]
    runner.metrics.set_degraded(True, "OperationalError: connection timed out")
    runner.forget_serving()
