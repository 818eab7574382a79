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


def test_an_idle_process_reports_a_database_outage_its_model_reloads_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with no readings to write (its assets quiet, or no partition) meets a database outage only in its
    model reloads: /readyz and /healthz must say so (503) and sensorwatch_dependency_down be 1, /livez stay 200,
    and all of it clear once a reload reads the database again (seen: 90 s of PostgreSQL down, /readyz 200)."""
    from sqlalchemy.exc import OperationalError

    from pipeline.store import repo

    runner = _runner(60)
    runner.metrics.mark_started()

    def up(**kwargs: object) -> dict[str, object]:
        return {}  # no model activated: nothing to swap

    monkeypatch.setattr(repo, "active_model_versions", up)
    assert runner.reload_models() == {} and runner.metrics.ready() == (True, "ok")

    def down(**kwargs: object) -> object:
        raise OperationalError("select", {}, Exception("connection refused"))

    monkeypatch.setattr(repo, "active_model_versions", down)
    assert runner.reload_models() == {}
    ready, reason = runner.metrics.ready()
    assert not ready and "connection refused" in reason
    assert not runner.metrics.healthy()[0] and runner.metrics.live()[0]
    assert runner.metrics.dependency_down._value.get() == 1
    assert runner._retry(lambda: "polled") == "polled"  # a poll that succeeds says nothing of the database
    assert not runner.metrics.ready()[0] and runner.metrics.dependency_down._value.get() == 1
    monkeypatch.setattr(repo, "active_model_versions", up)
    assert runner.reload_models() == {}
    assert runner.metrics.ready() == (True, "ok") and runner.metrics.dependency_down._value.get() == 0


def test_the_broker_outage_line_names_the_probes_that_fail(caplog: pytest.LogCaptureFixture) -> None:
    """An operator whose readiness probe is /readyz (and liveness /livez) reads which probes the outage fails: the
    line named /healthz only."""
    runner = _runner(60)
    with caplog.at_level("WARNING", logger="pipeline.runner"):
        assert runner._heard_from_broker(False, 0) is False
    line = next(r.getMessage() for r in caplog.records if "no Kafka broker answers" in r.getMessage())
    assert "/readyz and /healthz report 503" in line and "/livez stays 200" in line
    assert not runner.metrics.ready()[0] and runner.metrics.live()[0]


def test_readyz_names_what_the_start_waits_for() -> None:
    """Until the group is joined /readyz says what the start waits for: the brokers, the topic, the join."""
    runner = _runner(60)
    assert runner.metrics.ready() == (False, "starting: connecting to the brokers and joining the consumer group")
    runner.waiting_for_topic()
    topic = runner.config.kafka.topic
    assert runner.metrics.ready() == (
        False, f"starting: waiting for topic {topic} to exist (the broker reports no partitions of it)")
    runner.metrics.starting("joining the consumer group")
    assert runner.metrics.ready() == (False, "starting: joining the consumer group")
    runner.metrics.mark_started()
    assert runner.metrics.ready() == (True, "ok")


def test_a_dependency_call_that_does_not_return_shows_before_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """An offset commit to a coordinator that went away blocks 30 s before it fails: /readyz and /healthz report the
    call once it has waited BLOCKED_CALL_S (scaled down here), /livez stays up, and all is well once it returns; a
    poll, which waits for records by design, is not watched."""
    import pipeline.metrics as module

    monkeypatch.setattr(module, "BLOCKED_CALL_S", 0.2)
    runner = _runner(60)
    runner.metrics.mark_started()
    samples: list[tuple[tuple[bool, str], tuple[bool, str], tuple[bool, str]]] = []

    def blocked() -> str:
        time.sleep(0.25)
        samples.append((runner.metrics.ready(), runner.metrics.healthy(), runner.metrics.live()))
        return "committed"

    assert runner._retry(blocked) == "committed"
    ready, healthy, live = samples[0]
    assert not ready[0] and ready == healthy and ready[1].startswith("a database or broker call has not returned for")
    assert live == (True, "ok")
    assert runner.metrics.ready() == (True, "ok")  # returned: ready again
    samples.clear()
    assert runner._retry(blocked, watched=False) == "committed"
    assert samples[0][0] == (True, "ok")
